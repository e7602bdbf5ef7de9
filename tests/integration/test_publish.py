"""Integration tests of ``publish``/``publish_many`` on PostgreSQL: rows, redaction, idempotence, errors."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from django.db import transaction
from django.test import override_settings

from backplane import exceptions, outbox, streams
from backplane.conf import conf
from backplane.models import OutboxItem, Stream, Tenant
from backplane.store import postgresql

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


def test_publish__returns_event_id_and_inserts_row(tenant):
    event_id = outbox.publish(tenant, "run.updated", {"run_id": "r1", "status": "running"})

    row = OutboxItem.objects.get()
    assert row.event_id == event_id
    assert uuid.UUID(event_id)
    assert row.tenant_id == tenant.id
    assert row.kind == "event"
    assert row.type == "run.updated"
    assert row.stream == streams.tenant_stream(tenant.id)
    assert row.shard == streams.shard_of(tenant.id, conf.SHARDS)
    assert row.payload == {"run_id": "r1", "status": "running"}
    assert row.payload_bytes == len(b'{"run_id":"r1","status":"running"}')
    assert (row.stream_offset, row.assigned_at, row.forwarded_at) == (None, None, None)
    assert not Stream.objects.exists()  # streams get offsets from the relay, not from publish


def test_publish__audience_picks_stream(tenant):
    occurred = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)
    outbox.publish(tenant, "a.b", {}, device="node-7:x@y", event_id="dev")
    outbox.publish(tenant, "a.b", {}, role="operator", event_id="role")
    outbox.publish(tenant, "a.b", [], event_id="all", occurred_at=occurred)

    rows = dict(OutboxItem.objects.values_list("event_id", "stream"))
    assert rows == {
        "dev": streams.device_stream(tenant.id, "node-7:x@y"),
        "role": streams.role_stream(tenant.id, "operator"),
        "all": streams.tenant_stream(tenant.id),
    }
    assert OutboxItem.objects.get(event_id="all").occurred_at == occurred


def test_publish__redacts_before_insert_without_mutating_input(tenant):
    payload = {"user": "ann", "Password": "hunter2",
               "nested": [{"X-Api-Key": "k1", "ok": 1}], "browser": {"Cookie": "c", "refresh_token": "t"}}
    before = json.loads(json.dumps(payload))

    outbox.publish(tenant, "user.updated", payload)

    row = OutboxItem.objects.get()
    assert row.payload == {"user": "ann", "Password": "[REDACTED]", "nested": [{"X-Api-Key": "[REDACTED]", "ok": 1}],
                           "browser": {"Cookie": "[REDACTED]", "refresh_token": "[REDACTED]"}}
    assert payload == before
    assert "hunter2" not in json.dumps(row.payload)


def test_publish__idempotent_on_tenant_and_event_id(tenant):
    first = outbox.publish(tenant, "run.updated", {"v": 1}, event_id="run-1:v1")
    second = outbox.publish(tenant, "run.updated", {"v": 2}, event_id="run-1:v1")

    assert first == second == "run-1:v1"
    assert list(OutboxItem.objects.values_list("event_id", "payload")) == [("run-1:v1", {"v": 1})]


def test_publish__idempotent_inside_one_atomic_block(tenant):
    with transaction.atomic():
        outbox.publish(tenant, "run.updated", {"v": 1}, event_id="e-1")
        outbox.publish(tenant, "run.updated", {"v": 2}, event_id="e-1")
        outbox.publish(tenant, "run.updated", {"v": 3}, event_id="e-2")  # the transaction is still usable

    assert sorted(OutboxItem.objects.values_list("event_id", flat=True)) == ["e-1", "e-2"]


def test_publish_many__duplicate_ids_in_one_call_insert_once(tenant):
    ids = outbox.publish_many(tenant, [{"type": "a.b", "payload": 1, "event_id": "same"},
                                       {"type": "a.b", "payload": 2, "event_id": "same"}])

    assert ids == ["same", "same"]
    assert OutboxItem.objects.count() == 1


def test_publish__same_event_id_in_two_tenants_is_two_events(tenant, tenant_factory):
    other = tenant_factory("other")

    outbox.publish(tenant, "a.b", 1, event_id="shared")
    outbox.publish(other, "a.b", 2, event_id="shared")

    assert sorted(OutboxItem.objects.values_list("payload", flat=True)) == [1, 2]


def test_publish__tenant_by_object_uuid_str_id_and_slug(tenant):
    for ref in (tenant, tenant.id, str(tenant.id), tenant.slug):
        outbox.publish(ref, "a.b", {"ref": str(ref)})

    assert OutboxItem.objects.filter(tenant=tenant).count() == 4


@pytest.mark.parametrize("ref", ["nope", uuid.UUID(int=7), str(uuid.UUID(int=7)), ""])
def test_publish__unknown_tenant_writes_nothing(tenant, ref):
    with pytest.raises(exceptions.UnknownTenant):
        outbox.publish(ref, "a.b", {})

    assert not OutboxItem.objects.exists()


def test_publish__inactive_tenant_writes_nothing(tenant_factory):
    inactive = tenant_factory("gone", is_active=False)

    for ref in (inactive, inactive.id, "gone"):
        with pytest.raises(exceptions.InactiveTenant):
            outbox.publish(ref, "a.b", {})

    assert not OutboxItem.objects.exists()


BAD_EVENTS = [
    pytest.param({"payload": float("nan")}, exceptions.InvalidPayload, id="nan"),
    pytest.param({"payload": {"x": float("inf")}}, exceptions.InvalidPayload, id="infinity"),
    pytest.param({"payload": {"s": {1, 2}}}, exceptions.InvalidPayload, id="set"),
    pytest.param({"payload": {"password": {1}}}, exceptions.InvalidPayload, id="set-under-secret-key"),
    pytest.param({"payload": object()}, exceptions.InvalidPayload, id="object"),
    pytest.param({"payload": "x" * 70_000}, exceptions.PayloadTooLarge, id="too-large"),
    pytest.param({"type": "Run.Updated"}, exceptions.InvalidEventType, id="type-upper"),
    pytest.param({"type": "run..updated"}, exceptions.InvalidEventType, id="type-empty-word"),
    pytest.param({"type": ""}, exceptions.InvalidEventType, id="type-empty"),
    pytest.param({"type": None}, exceptions.InvalidEventType, id="type-none"),
    pytest.param({"device": "d-1", "role": "node"}, exceptions.InvalidAudience, id="device-and-role"),
    pytest.param({"device": "bad id"}, exceptions.InvalidAudience, id="device-space"),
    pytest.param({"device": ""}, exceptions.InvalidAudience, id="device-empty"),
    pytest.param({"device": "d" * 129}, exceptions.InvalidAudience, id="device-too-long"),
    pytest.param({"device": 7}, exceptions.InvalidAudience, id="device-int"),
    pytest.param({"role": "admin"}, exceptions.InvalidAudience, id="role-unknown"),
    pytest.param({"event_id": "bad id"}, exceptions.InvalidEventId, id="event-id-space"),
    pytest.param({"event_id": "-lead"}, exceptions.InvalidEventId, id="event-id-lead"),
    pytest.param({"event_id": "e" * 101}, exceptions.InvalidEventId, id="event-id-too-long"),
    pytest.param({"event_id": 5}, exceptions.InvalidEventId, id="event-id-int"),
    pytest.param({"occurred_at": datetime(2026, 1, 1)}, exceptions.PublishError, id="naive-occurred-at"),
    pytest.param({"colour": "red"}, exceptions.PublishError, id="unknown-field"),
]


@pytest.mark.parametrize(("bad", "error"), BAD_EVENTS)
def test_publish_many__one_bad_item_writes_nothing(tenant, bad, error):
    good = {"type": "run.updated", "payload": {"ok": True}}
    events = [dict(good, event_id="g-1"), {**good, **bad}, dict(good, event_id="g-2")]

    with pytest.raises(error) as info:
        outbox.publish_many(tenant, events)

    assert isinstance(info.value, exceptions.BackplaneError)
    assert not OutboxItem.objects.exists()


@pytest.mark.parametrize(("bad", "error"), [p for p in BAD_EVENTS if p.id != "unknown-field"])
def test_publish__bad_input_raises_named_error_and_writes_nothing(tenant, bad, error):
    spec = {"type": "run.updated", "payload": {}, **bad}

    with pytest.raises(error):
        outbox.publish(tenant, spec.pop("type"), spec.pop("payload"), **spec)

    assert not OutboxItem.objects.exists()


def test_publish__payload_cap_counts_compact_utf8_bytes(tenant):
    with override_settings(BACKPLANE={"MAX_PAYLOAD_BYTES": 10}):
        outbox.publish(tenant, "a.b", "é" * 4)  # '"éééé"' is 10 bytes
        with pytest.raises(exceptions.PayloadTooLarge):
            outbox.publish(tenant, "a.b", "é" * 5)
        with pytest.raises(exceptions.PayloadTooLarge):
            outbox.publish(tenant, "a.b", ["x"] * 3)  # '["x","x","x"]' is 13 bytes

    assert list(OutboxItem.objects.values_list("payload_bytes", flat=True)) == [10]


@pytest.mark.parametrize("bad", [{"type": "run.updated\n"}, {"device": "dev-1\n"}, {"event_id": "e-1\n"}])
def test_publish__trailing_newline_is_malformed(tenant, bad):
    spec = {"type": "run.updated", "payload": {}, **bad}

    with pytest.raises(exceptions.PublishError):
        outbox.publish(tenant, spec.pop("type"), spec.pop("payload"), **spec)

    assert not OutboxItem.objects.exists()


def test_publish__deleted_tenant_object_is_unknown(tenant_factory):
    gone = tenant_factory("gone")
    Tenant.objects.filter(pk=gone.pk).delete()

    with pytest.raises(exceptions.UnknownTenant):
        outbox.publish(gone, "a.b", {})

    assert not OutboxItem.objects.exists()


def test_publish__tenant_deactivated_since_object_was_loaded_is_inactive(tenant):
    Tenant.objects.filter(pk=tenant.pk).update(is_active=False)

    with pytest.raises(exceptions.InactiveTenant):
        outbox.publish(tenant, "a.b", {})

    assert not OutboxItem.objects.exists()


@pytest.mark.parametrize("payload", [{"note": "a\x00b"}, {"k\x00": 1}, ["\x00"]])
def test_publish__nul_character_is_invalid_payload_and_writes_nothing(tenant, payload):
    """PostgreSQL's jsonb cannot store NUL: refuse it up front, with a named error (and no
    driver message that would quote the payload)."""
    with pytest.raises(exceptions.InvalidPayload):
        outbox.publish(tenant, "run.updated", payload)
    assert OutboxItem.objects.count() == 0


def test_publish__literal_backslash_u0000_text_is_fine(tenant):
    outbox.publish(tenant, "run.updated", {"note": "\\u0000"})
    assert OutboxItem.objects.get().payload == {"note": "\\u0000"}


def test_publish_many__inactive_tenant_midway_writes_no_chunk(tenant, monkeypatch):
    """A publish of several chunks is all or nothing even if the tenant changes between them."""
    monkeypatch.setattr(postgresql, "INSERT_CHUNK", 2)
    calls = {"n": 0}
    real = postgresql._execute_raw

    def flip_after_first(cur, sql, params, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            Tenant.objects.filter(pk=tenant.pk).update(is_active=False)
        return real(cur, sql, params, **kw)

    monkeypatch.setattr(postgresql, "_execute_raw", flip_after_first)
    with pytest.raises(exceptions.InactiveTenant):
        outbox.publish_many(tenant, [{"type": "a.b", "payload": {"i": i}} for i in range(5)])
    assert OutboxItem.objects.count() == 0


def test_publish_many__rows_keep_the_order_given_and_their_fields(tenant):
    # Ids that sort (and hash) in another order than the list: the outbox ids, which the relay
    # numbers offsets by, must still follow the list.
    ids = [f"ev-{(n * 7919) % 1000:04d}-{n}" for n in range(300)]
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    events = [
        {"type": "run.step", "payload": {"n": n, "text": "é\n\"q\""}, "event_id": eid, "device": f"d-{n % 3}",
         "occurred_at": when}
        for n, eid in enumerate(ids)
    ]
    assert outbox.publish_many(tenant, events) == ids
    rows = list(OutboxItem.objects.order_by("id").values_list("event_id", "stream", "payload", "occurred_at",
                                                             "payload_bytes"))
    assert [r[0] for r in rows] == ids
    for n, (_, stream, payload, occurred_at, size) in enumerate(rows):
        assert stream == streams.device_stream(tenant.id, f"d-{n % 3}")
        assert payload == {"n": n, "text": "é\n\"q\""}
        assert occurred_at == when
        assert size == len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def _prepared_publish_statements() -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s", ["%backplane_eventkey%"])
        return cur.fetchone()[0]


def test_publish__statements_prepared_once_per_session_and_reused(tenant):
    from django.db import connection

    connection.close()  # a fresh session: nothing prepared yet
    outbox.publish(tenant, "a.b", {"n": 1})
    outbox.publish(tenant, "a.b", {"n": 2})
    outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": 3}}, {"type": "a.b", "payload": {"n": 4}}])
    outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": n}} for n in range(5, 9)])
    # One statement for publish(), one for publish_many() whatever its size; Django's own
    # statements (this query too) stay unprepared.
    assert _prepared_publish_statements() == 2
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cur.fetchone()[0] == 2
    assert sorted(r["payload"]["n"] for r in OutboxItem.objects.values("payload")) == list(range(1, 9))


@override_settings(BACKPLANE={"PREPARED_STATEMENTS": False})
def test_publish__prepared_statements_off_prepares_nothing(tenant):
    from django.db import connection

    connection.close()
    outbox.publish(tenant, "a.b", {"n": 1})
    outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": 2}}, {"type": "a.b", "payload": {"n": 3}}])
    assert _prepared_publish_statements() == 0
    assert OutboxItem.objects.count() == 3


def test_publish__prepared_statement_survives_a_rolled_back_transaction(tenant):
    from django.db import connection

    connection.close()
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.publish(tenant, "a.b", {"n": 1}, event_id="gone")
        raise RuntimeError("the producer's own failure")
    outbox.publish(tenant, "a.b", {"n": 2}, event_id="kept")
    assert list(OutboxItem.objects.values_list("event_id", flat=True)) == ["kept"]
    assert _prepared_publish_statements() == 1


@pytest.fixture
def small_slices(monkeypatch):
    """publish_many's pipelined path (for more than PIPELINE_SLICE events) with slices of 3."""
    monkeypatch.setattr(postgresql, "PIPELINE_SLICE", 3)
    sent = {"slices": 0}
    real = postgresql._many_params

    def counting(*args):  # type: ignore[no-untyped-def]
        sent["slices"] += 1
        return real(*args)

    monkeypatch.setattr(postgresql, "_many_params", counting)
    return sent


def test_publish_many__pipelined_slices_keep_order_fields_and_dedupe(tenant, small_slices):
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    events = [
        {"type": "run.step", "payload": {"n": n, "token": "s3cret"}, "device": f"d-{n % 2}"}
        | ({"event_id": "twice"} if n in (1, 7) else {})
        | ({"occurred_at": when} if n % 3 == 0 else {})
        for n in range(10)
    ]
    with transaction.atomic():
        returned = outbox.publish_many(tenant, events)
    assert small_slices["slices"] == 4
    assert len(returned) == 10 and returned[1] == returned[7] == "twice"
    made = [eid for n, eid in enumerate(returned) if n not in (1, 7)]
    assert all(uuid.UUID(eid).version == 7 for eid in made) and len(set(made)) == 8
    rows = list(OutboxItem.objects.order_by("id").values_list("event_id", "stream", "payload", "occurred_at"))
    assert [r[0] for r in rows] == [eid for n, eid in enumerate(returned) if n != 7]  # the repeat is one event
    for (_, stream, payload, occurred_at), n in zip(rows, [n for n in range(10) if n != 7], strict=True):
        assert stream == streams.device_stream(tenant.id, f"d-{n % 2}")
        assert payload == {"n": n, "token": "[REDACTED]"}
        if n % 3 == 0:
            assert occurred_at == when
    defaults = {r[3] for r, n in zip(rows, [n for n in range(10) if n != 7], strict=True) if n % 3}
    assert len(defaults) == 1  # one default time for the call


def test_publish_many__pipelined_bad_event_after_slices_went_out_writes_nothing(tenant, small_slices):
    """A bad event found after earlier slices were sent rolls them back, and the caller's
    transaction goes on (as when every event is validated before anything is sent)."""
    events = [{"type": "a.b", "payload": {"n": n}} for n in range(10)]
    events[7] = {"type": "Not A Type", "payload": {}}
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {"before": True}, event_id="before")
        with pytest.raises(exceptions.InvalidEventType):
            outbox.publish_many(tenant, events)
        assert small_slices["slices"] == 2  # two slices had gone out when the bad one was found
        outbox.publish(tenant, "a.b", {"after": True}, event_id="after")
    assert list(OutboxItem.objects.order_by("id").values_list("event_id", flat=True)) == ["before", "after"]


def test_publish_many__pipelined_inactive_tenant_writes_nothing(tenant, small_slices):
    Tenant.objects.filter(pk=tenant.pk).update(is_active=False)
    with pytest.raises(exceptions.InactiveTenant):
        outbox.publish_many(tenant.id, [{"type": "a.b", "payload": {"n": n}} for n in range(10)])
    assert not OutboxItem.objects.exists()


def test_publish_many__pipelined_unknown_tenant_writes_nothing(small_slices):
    with pytest.raises(exceptions.UnknownTenant):
        outbox.publish_many(uuid.uuid4(), [{"type": "a.b", "payload": {"n": n}} for n in range(10)])
    assert not OutboxItem.objects.exists()


def test_publish__a_broken_connection_is_marked_and_replaced(tenant):
    """A publish() on a session the server has cut raises StoreUnavailable, and the next one
    runs on a new session (the dead one is not reused)."""
    from django.db import connection

    connection.ensure_connection()
    connection.close_at = None  # a persistent connection (CONN_MAX_AGE=None)
    pid = connection.connection.info.backend_pid
    with psycopg.connect(conf_url(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(exceptions.StoreUnavailable):
        outbox.publish(tenant, "a.b", {"n": 1})
    outbox.publish(tenant, "a.b", {"n": 2})
    assert connection.connection.info.backend_pid != pid
    assert [r["n"] for r in OutboxItem.objects.values_list("payload", flat=True)] == [2]


def conf_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
