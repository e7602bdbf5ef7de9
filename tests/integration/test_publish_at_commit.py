"""publish() of one event inside a transaction goes with the COMMIT (PostgreSQL,
``PUBLISH_AT_COMMIT``): same contract as a statement of its own — it commits or rolls back with
the transaction (savepoints included), is idempotent by (tenant, event_id), a bad event raises
before anything is written, and a tenant found inactive at commit fails the whole transaction."""

from __future__ import annotations

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.test import override_settings

from backplane import exceptions, outbox
from backplane.models import EventKey, OutboxItem, Tenant
from backplane.store import postgresql

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tenant(tenant_factory):
    t = tenant_factory("acme")
    outbox.publish(t, "warm.up", {}, event_id="warm")  # at once: the tenant is now known active
    return t


def waiting() -> int:
    return len(postgresql._waiting(connections[connection.alias]))


def _url() -> str:
    """The test database's URL, for a session of its own."""
    s = connection.settings_dict
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def events() -> list[str]:
    return list(OutboxItem.objects.exclude(event_id="warm").order_by("id").values_list("event_id", flat=True))


def test_event_waits_for_the_commit_and_commits_with_it(tenant):
    with transaction.atomic():
        event_id = outbox.publish(tenant, "run.updated", {"n": 1})
        assert waiting() == 1  # nothing sent yet: it goes with the COMMIT
    assert waiting() == 0
    assert events() == [event_id]
    assert EventKey.objects.filter(tenant_id=tenant.id, event_id=event_id).exists()


def test_rollback_leaves_nothing(tenant):
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.publish(tenant, "run.updated", {"n": 1}, event_id="gone")
        raise RuntimeError
    assert events() == []
    assert not EventKey.objects.filter(event_id="gone").exists()
    with transaction.atomic():  # the next transaction commits nothing of it either
        pass
    assert events() == []


def test_a_rolled_back_savepoint_drops_its_events_only(tenant):
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            outbox.publish(tenant, "a.b", {}, event_id="dropped")
            raise RuntimeError
        outbox.publish(tenant, "a.b", {}, event_id="after")
    assert events() == ["kept", "after"]


def test_the_next_statement_sees_the_event_and_ids_keep_call_order(tenant):
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="first")
        assert OutboxItem.objects.filter(event_id="first").exists()  # sent before this query
        outbox.publish(tenant, "a.b", {}, event_id="second")
        outbox.publish_many(tenant, [{"type": "a.b", "payload": {}, "event_id": "third"}])
    assert events() == ["first", "second", "third"]


def test_duplicate_event_id_in_the_same_and_another_transaction_is_one_event(tenant):
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {"v": 1}, event_id="dup")
        outbox.publish(tenant, "a.b", {"v": 2}, event_id="dup")
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {"v": 3}, event_id="dup")
    assert list(OutboxItem.objects.filter(event_id="dup").values_list("payload", flat=True)) == [{"v": 1}]


def test_a_bad_event_raises_at_the_call_and_nothing_waits(tenant):
    with transaction.atomic():
        with pytest.raises(exceptions.InvalidPayload):
            outbox.publish(tenant, "a.b", {"x": float("nan")})
        with pytest.raises(exceptions.InvalidEventType):
            outbox.publish(tenant, "Bad Type", {})
        assert waiting() == 0
    assert events() == []


def test_quotes_and_backslashes_arrive_as_given(tenant):
    payload = {"s": "it's \\'quoted\\' \"x\" '); DROP TABLE backplane_outboxitem; --", "u": "é\u2028"}
    with transaction.atomic():
        outbox.publish(tenant, "a.b", payload, event_id="q1")
    assert OutboxItem.objects.get(event_id="q1").payload == payload


def test_a_tenant_deactivated_meanwhile_fails_the_whole_transaction_at_commit(tenant, tenant_factory):
    other = tenant_factory("other")
    Tenant.objects.filter(pk=tenant.pk).update(is_active=False)  # as another process would: no signal
    with pytest.raises(exceptions.InactiveTenant), transaction.atomic():
        Tenant.objects.filter(pk=other.pk).update(name="changed")
        outbox.publish(tenant, "a.b", {}, event_id="late")
    assert Tenant.objects.get(pk=other.pk).name == "Other"  # rolled back with it
    assert events() == []
    with pytest.raises(exceptions.InactiveTenant):  # and the next publish asks at once
        outbox.publish(tenant, "a.b", {})
    with transaction.atomic():  # the connection is usable
        outbox.publish(other, "a.b", {}, event_id="fine")
    assert events() == ["fine"]


def test_a_deactivation_through_the_orm_is_seen_at_the_call(tenant):
    tenant.is_active = False
    tenant.save()
    with pytest.raises(exceptions.InactiveTenant), transaction.atomic():
        outbox.publish(tenant, "a.b", {})


@override_settings(BACKPLANE={"PUBLISH_AT_COMMIT": False})
def test_off_sends_the_statement_at_once(tenant):
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="now")
        assert waiting() == 0
    assert events() == ["now"]


def test_the_doorbell_rings_once_per_publish_after_the_commit_only(tenant, monkeypatch):
    from backplane import doorbell, streams
    from backplane.conf import conf

    rung: list[int] = []
    monkeypatch.setattr(doorbell, "ring", rung.append)
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="r1")
        with pytest.raises(RuntimeError), transaction.atomic():
            outbox.publish(tenant, "a.b", {}, event_id="r2")  # its ring goes with its savepoint
            raise RuntimeError
        assert rung == []  # nothing before the commit
    assert rung == [shard]
    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="r3")
        raise RuntimeError
    assert rung == [shard]  # a rolled-back transaction rings nothing
    assert events() == ["r1"]


def test_a_session_cut_before_the_commit_raises_store_unavailable_and_writes_nothing(tenant):
    import psycopg

    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    url = _url()
    # StoreUnavailable from the commit; Django's atomic block then fails to reset autocommit on
    # the dead session and raises its own OperationalError over it (as before 0034).
    with pytest.raises((exceptions.StoreUnavailable, OperationalError)) as caught, transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="cut")
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    chain: list[BaseException] = []
    err: BaseException | None = caught.value
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, exceptions.StoreUnavailable) for e in chain)
    assert connection.errors_occurred  # marked, so Django replaces the session
    connection.close()
    assert events() == []


def test_the_events_commit_ends_the_transaction_for_other_sessions_too(tenant):
    """The COMMIT sent with the event ends the transaction (Django's own commit is skipped
    then): another session sees the event and the state change, and this one is idle."""
    import psycopg

    connection.ensure_connection()
    url = _url()
    with transaction.atomic():
        Tenant.objects.filter(pk=tenant.pk).update(name="seen")
        event_id = outbox.publish(tenant, "a.b", {}, event_id="ends")
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with psycopg.connect(url, autocommit=True) as other:
        found = other.execute(
            "SELECT (SELECT name FROM backplane_tenant WHERE id = %s),"
            " (SELECT count(*) FROM backplane_outboxitem WHERE event_id = %s)",
            [tenant.pk, event_id],
        ).fetchone()
    assert found == ("seen", 1)
    with transaction.atomic():  # the next transaction starts and commits as usual
        outbox.publish(tenant, "a.b", {}, event_id="next")
    assert events() == ["ends", "next"]


def test_a_session_without_standard_conforming_strings_sends_the_event_at_once(tenant):
    """Literals are written for standard_conforming_strings on, read from libpq's copy of the
    setting at every call: a SET in the session is seen at the next publish."""
    with connection.cursor() as cur:
        cur.execute("SET standard_conforming_strings = off")
    try:
        with transaction.atomic():
            outbox.publish(tenant, "a.b", {"s": "back\\slash"}, event_id="sent-now")
            assert waiting() == 0  # went as a statement of its own
        assert OutboxItem.objects.get(event_id="sent-now").payload == {"s": "back\\slash"}
    finally:
        with connection.cursor() as cur:
            cur.execute("SET standard_conforming_strings = on")
    with transaction.atomic():
        outbox.publish(tenant, "a.b", {}, event_id="waits")
        assert waiting() == 1
