"""The store's contract (``backplane.store.base``) on the configured database: SQLite in a unit
run (no services), PostgreSQL when DATABASE_URL points at one (then the relay's calls go
through ``bp_assign_v2``)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from backplane import exceptions, outbox, streams
from backplane.conf import conf
from backplane.models import OutboxItem, Stream, Tenant
from backplane.store import Pending, get_store

pytestmark = pytest.mark.django_db(transaction=True)

ALL = list(range(16))
WHEN = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def tenant() -> Tenant:
    return Tenant.objects.create(slug="acme", name="Acme")


@pytest.fixture
def store():  # type: ignore[no-untyped-def]
    yield get_store()
    asyncio.run(sync_to_async(connections.close_all)())  # the database thread's connection


def publish(tenant: Tenant, *names: str, **audience: str) -> None:
    outbox.publish_many(
        tenant, [{"type": "a.b", "payload": {"n": n}, "event_id": n, "occurred_at": WHEN, **audience} for n in names]
    )


def test_store__one_is_picked_for_the_configured_database(store) -> None:
    assert store.vendor == ("postgresql" if conf.is_postgresql else "sqlite")
    assert store.single_thread is (store.vendor == "sqlite")
    assert get_store() is store


def test_store__assign_numbers_each_stream_from_one_in_id_order_with_an_epoch(store, tenant) -> None:
    publish(tenant, "d1", "d2", device="dev-1")
    publish(tenant, "t1")
    publish(tenant, "d3", device="dev-1")

    got = store.assign(ALL, 100)

    device, whole = streams.device_stream(tenant.id, "dev-1"), streams.tenant_stream(tenant.id)
    assert [(p.stream, p.item.offset, p.item.event_id) for p in got] == sorted(
        [(device, 1, "d1"), (device, 2, "d2"), (device, 3, "d3"), (whole, 1, "t1")]
    )
    epochs = {p.stream: p.epoch for p in got}
    assert epochs == {key: head.epoch for key, head in store.stream_heads([device, whole]).items()}
    first = got[0]
    assert isinstance(first, Pending) and first.kind == "event" and first.tenant_id == tenant.id
    assert first.shard == streams.shard_of(tenant.id, conf.SHARDS)
    assert (first.item.type, first.item.occurred_at) == ("a.b", "2026-01-02T03:04:05.678901Z")
    assert json.loads(first.item.payload_json) == {"n": "d1"}  # JSON text, spliced into frames
    assert store.assign(ALL, 100) == []  # nothing left without an offset


def test_store__assign_continues_a_stream_and_respects_limit_and_tenants(store, tenant) -> None:
    other = Tenant.objects.create(slug="other", name="Other")
    publish(tenant, "a1", "a2", "a3")
    publish(other, "b1")

    assert [p.item.offset for p in store.assign(ALL, 2)] == [1, 2]
    assert [p.item.event_id for p in store.assign(ALL, 10, skip_tenants=[tenant.id])] == ["b1"]
    assert [p.item.offset for p in store.assign(ALL, 10, only_tenant=tenant.id)] == [3]
    assert store.assign([s for s in ALL if s != streams.shard_of(tenant.id, conf.SHARDS)], 10) == []


def test_store__append_is_idempotent_on_tenant_and_event_id(store, tenant) -> None:
    publish(tenant, "same")
    publish(tenant, "same", "new")
    assert sorted(OutboxItem.objects.values_list("event_id", flat=True)) == ["new", "same"]


@pytest.mark.parametrize("state", ["unknown", "inactive"])
def test_store__append_refuses_an_unknown_or_inactive_tenant_and_writes_nothing(store, tenant, state) -> None:
    rows = [(streams.tenant_stream(tenant.id), "e-1", "a.b", WHEN, "{}", 2)]
    if state == "inactive":
        Tenant.objects.filter(pk=tenant.pk).update(is_active=False)
    tenant_id = tenant.id if state == "inactive" else uuid.uuid4()
    error = exceptions.InactiveTenant if state == "inactive" else exceptions.UnknownTenant
    with pytest.raises(error):
        store.append(tenant_id, 0, iter(rows), 1)
    assert not OutboxItem.objects.exists()


def test_store__unforwarded_until_marked(store, tenant) -> None:
    publish(tenant, "e1", "e2", "e3")
    assigned = store.assign(ALL, 10)
    assert store.unforwarded(ALL, 10) == assigned
    assert store.unforwarded(ALL, 10, skip_tenants=[tenant.id]) == []
    assert store.pending_tenants(ALL) == [tenant.id]

    store.mark_forwarded([assigned[0].id], [assigned[0].part])

    assert [p.item.event_id for p in store.unforwarded(ALL, 10)] == ["e2", "e3"]
    store.mark_forwarded([p.id for p in assigned[1:]])
    assert store.unforwarded(ALL, 10) == [] and store.pending_tenants(ALL) == []


def test_store__relay_session_assigns_and_carries_the_marks_of_what_was_sent(store, tenant) -> None:
    async def relay_side() -> tuple[list[int], list[str], list[str]]:
        session = await store.aopen_session()
        try:
            taken = await store.atake_shards(session, ALL)
            sent = await store.aassign(session, taken, 10)
            await sync_to_async(publish)(tenant, "e2")
            fresh = await store.aassign(session, taken, 10, forwarded=sent)
            left = await sync_to_async(store.unforwarded)(ALL, 10)
            await store.amark_forwarded(session, fresh)
            assert not store.is_dead(session)
        finally:
            await store.aclose_session(session)
        assert store.is_dead(session)
        return taken, [p.item.event_id for p in fresh], [p.item.event_id for p in left]

    publish(tenant, "e1")
    taken, fresh, left = asyncio.run(relay_side())
    assert taken == ALL and fresh == ["e2"] and left == ["e2"]  # e1 was marked with e2's assignment
    assert store.unforwarded(ALL, 10) == []


def test_store__ensure_streams_creates_at_zero_once_and_reads_ranges(store, tenant) -> None:
    keys = list(streams.connection_streams(tenant.id, "client", "dev-1").values())
    heads = store.ensure_streams(tenant.id, keys)
    assert sorted(heads) == sorted(keys)
    assert all(h.offset == 0 and h.first_retained == 1 and len(h.epoch) == 8 for h in heads.values())
    assert store.ensure_streams(tenant.id, keys) == heads  # not made again: same epochs
    assert set(Stream.objects.values_list("audience", flat=True)) == {"tenant", "role", "device"}

    publish(tenant, "e1", "e2", "e3", device="dev-1")
    store.assign(ALL, 10)
    device = streams.device_stream(tenant.id, "dev-1")
    assert store.stream_heads([device])[device].epoch == heads[device].epoch
    assert [i.event_id for i in store.read_range(device, 1, 3)] == ["e2", "e3"]
    assert store.read_range(device, 3, 3) == [] and store.stream_heads([]) == {}


def test_store__heads_moved_since_names_only_the_streams_whose_head_moved_after_the_time(store, tenant) -> None:
    keys = list(streams.connection_streams(tenant.id, "client", "dev-1").values())
    store.ensure_streams(tenant.id, keys)
    clock, none = store.heads_moved_since(None)
    assert none == {} and clock.tzinfo is not None  # the database's clock only

    publish(tenant, "e1", "e2", device="dev-1")
    store.assign(ALL, 10)
    device = streams.device_stream(tenant.id, "dev-1")
    later, moved = store.heads_moved_since(clock - timedelta(seconds=2))  # SQLite stamps whole seconds
    assert later >= clock
    assert moved[device] == store.stream_heads([device])[device] and moved[device].offset == 2
    _, after = store.heads_moved_since(later + timedelta(seconds=2))
    assert after == {}  # nothing moved since


@pytest.mark.parametrize(
    "bucket_edge", [datetime(2026, 1, 2, 3, 4, 10, tzinfo=UTC), datetime(2026, 1, 2, 3, 5, tzinfo=UTC)]
)
def test_store__heads_moved_since_finds_a_head_moved_just_after_the_time_across_a_bucket_edge(
    store, tenant, bucket_edge
) -> None:
    # The feed reads by a 10-second bucket of updated_at (docs/decisions/0036-hot-stream-heads.md):
    # a head stamped in the bucket after the one of the time asked must still be found.
    keys = list(streams.connection_streams(tenant.id, "client", "dev-1").values())
    store.ensure_streams(tenant.id, keys)
    device, whole = streams.device_stream(tenant.id, "dev-1"), streams.tenant_stream(tenant.id)
    Stream.objects.filter(key=device).update(updated_at=bucket_edge)
    Stream.objects.filter(key=whole).update(updated_at=bucket_edge - timedelta(seconds=1))
    Stream.objects.exclude(key__in=[device, whole]).update(updated_at=bucket_edge - timedelta(seconds=30))

    _, moved = store.heads_moved_since(bucket_edge - timedelta(microseconds=1))
    assert set(moved) == {device}
    _, moved = store.heads_moved_since(bucket_edge - timedelta(seconds=1, microseconds=1))
    assert set(moved) == {device, whole}
    _, moved = store.heads_moved_since(bucket_edge)
    assert moved == {}


def test_store__both_implementations_have_every_member_of_the_interface_with_its_signature() -> None:
    import inspect

    from backplane.store.base import Store
    from backplane.store.postgresql import PostgreSQLStore
    from backplane.store.sqlite import SQLiteStore

    members = [n for n in vars(Store) if not n.startswith("_")] + list(Store.__annotations__)
    assert {"append", "aassign", "unforwarded", "ensure_streams", "read_range", "single_thread"} <= set(members)
    for cls in (PostgreSQLStore, SQLiteStore):
        for name in members:
            assert hasattr(cls, name), (cls.__name__, name)
            wanted = getattr(Store, name, None)
            if callable(wanted):
                got = getattr(cls, name)
                assert inspect.signature(got).parameters.keys() == inspect.signature(wanted).parameters.keys(), name
                assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(wanted), name


def test_store__idle_streams_by_the_moved_bucket_on_either_backend(store, tenant) -> None:
    """retention.idle_streams bounds by moved_bucket (generated by each backend's own SQL) and
    updated_at: only a stream idle past the cut-off with no rows left is found, to the microsecond."""
    from backplane import retention

    publish(tenant, "d1", device="dev-idle")
    publish(tenant, "d2", device="dev-rows")
    publish(tenant, "d3", device="dev-recent")
    store.assign(ALL, 100)
    idle, rows, recent = (streams.device_stream(tenant.id, d) for d in ("dev-idle", "dev-rows", "dev-recent"))
    OutboxItem.objects.filter(event_id__in=["d1", "d3"]).delete()
    cut = WHEN + timedelta(seconds=25)
    Stream.objects.filter(key__in=[idle, rows]).update(updated_at=cut - timedelta(microseconds=1))
    Stream.objects.filter(key=recent).update(updated_at=cut)

    assert set(retention.idle_streams(cut)) == {idle}
    assert set(retention.idle_streams(cut + timedelta(microseconds=1))) == {idle, recent}


def test_store__relay_statement_writes_only_ints_uuids_and_nulls_into_its_text() -> None:
    from backplane.store.postgresql import _statement

    tenant = uuid.UUID("8c0f3a52-4b8e-4f6b-9b1a-2d1f0c3e4a5b")
    sql = "SELECT f(%s::int[], %s::int, %s::uuid, %s::uuid[], %s::uuid)"
    assert _statement(sql, [[0, 3], 1000, None, [tenant, str(tenant)], tenant]) == (
        f"SELECT f('{{0,3}}'::int[], 1000::int, NULL::uuid, '{{{tenant},{tenant}}}'::uuid[], '{tenant}'::uuid)"
    )
    assert _statement("SELECT %s::uuid[]", [[]]) == "SELECT '{}'::uuid[]"
    # Anything that could carry a quote (or is no id) is refused, not written.
    for bad in ("x'); DROP TABLE t; --", 1.5, True, b"1", {"a": 1}):
        with pytest.raises((TypeError, ValueError)):
            _statement("SELECT %s", [bad])
        with pytest.raises((TypeError, ValueError)):
            _statement("SELECT %s", [[bad]])
