"""The relay's claim floor on PostgreSQL (backplane.claims, bp_assign_v4): the claim starts
above it; it never passes a row a running transaction may still commit; a row below it is
claimed by the next full scan, late but not lost."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from backplane import outbox, streams
from backplane.claims import ClaimFloor
from backplane.conf import conf
from backplane.models import OutboxItem
from backplane.store import get_store
from backplane.store.postgresql import SQL, _statement

from .helpers import orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROUNDS = 6  # assignments while a transaction is held: more than the two a floor needs to move


@pytest.fixture
async def session(services: None) -> AsyncIterator[Any]:
    store = get_store()
    conn = await store.aopen_session()
    yield conn
    await store.aclose_session(conn)


async def publish_and_claim(conn: Any, tenant: Any, floor: ClaimFloor, n: int) -> list[Any]:
    await orm(outbox.publish, tenant, "a.b", {"n": n})
    return await get_store().aassign(conn, [streams.shard_of(tenant.id, conf.SHARDS)], 100, floor=floor)


async def test_floor__rises_with_the_assignments_and_the_claim_starts_above_it(session, tenant_factory):
    tenant = await orm(tenant_factory, "acme")
    floor = ClaimFloor(full_scan_secs=1000.0, reading_secs=0.0)
    claimed = []
    for n in range(ROUNDS):
        claimed += await publish_and_claim(session, tenant, floor, n)
    assert len(claimed) == ROUNDS  # each event once
    assert floor.raised >= 2
    # It stays below what the last assignments claimed (their transactions' elders may run).
    assert 0 < floor.after < max(p.id for p in claimed)
    assert floor.after >= sorted(p.id for p in claimed)[1]
    # The call passes it: the claim's scan starts above it.
    sent: list[str] = []
    execute = session.execute

    async def recording(query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return await execute(query, *args, **kwargs)

    session.execute = recording
    before = floor.after
    got = await publish_and_claim(session, tenant, floor, ROUNDS)
    assert len(got) == 1
    assert f"'{{}}'::uuid[], {before}::bigint)" in sent[0], sent
    # The id sequence is looked up once, then named by its oid.
    assert isinstance(floor.sequence, int) and f"coalesce({floor.sequence}::oid" in sent[0], sent
    # The readings ride along at most every reading_secs: a call without them passes the floor too.
    floor.reading_secs = 1000.0
    floor.reading_at = 0.0
    sent.clear()
    await publish_and_claim(session, tenant, floor, ROUNDS + 10)  # with the readings (due)
    await publish_and_claim(session, tenant, floor, ROUNDS + 11)  # without
    assert "claim_horizon" not in sent[1] and "pg_snapshot_xmin" not in sent[1], sent
    assert sent[1].startswith("SELECT r_id") and f"{floor.after}::bigint)" in sent[1], sent
    floor.reading_secs, floor.reading_at = 0.0, 0.0
    floor.sequence = 1  # an oid that is no sequence (a migration made it anew): looked up again
    raised = floor.raised
    for n in range(3):
        await publish_and_claim(session, tenant, floor, ROUNDS + 1 + n)
    assert isinstance(floor.sequence, int) and floor.sequence != 1 and floor.raised > raised


async def test_assign_v4__claims_only_rows_above_the_floor_it_is_given(session, tenant_factory):
    tenant = await orm(tenant_factory, "acme")
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    for n in range(3):
        await orm(outbox.publish, tenant, "a.b", {"n": n})
    ids = await orm(lambda: sorted(OutboxItem.objects.values_list("id", flat=True)))
    call = _statement(SQL["assign"], [[shard], 100, None, [], ids[1]])
    cur = await session.execute(call, prepare=False)
    assert [r[0] for r in await cur.fetchall()] == [ids[2]]  # the two at or below the floor are left
    cur = await session.execute(_statement(SQL["assign"], [[shard], 100, None, [], 0]), prepare=False)
    assert [r[0] for r in await cur.fetchall()] == ids[:2]


async def test_floor__stays_when_the_id_sequence_caches_ids_per_backend(session, tenant_factory):
    tenant = await orm(tenant_factory, "acme")
    floor = ClaimFloor(full_scan_secs=1000.0, reading_secs=0.0)
    seq = "pg_get_serial_sequence('backplane_outboxitem', 'id')"
    cur = await session.execute(f"SELECT {seq}")
    (name,) = await cur.fetchone()
    await session.execute(f"ALTER SEQUENCE {name} CACHE 20")
    try:
        for n in range(ROUNDS):
            assert len(await publish_and_claim(session, tenant, floor, n)) == 1
        assert (floor.after, floor.raised) == (0, 0)
    finally:
        await session.execute(f"ALTER SEQUENCE {name} CACHE 1")
        await orm(lambda: connection.close())  # the producer's connection drops the ids it had cached
    for n in range(ROUNDS):
        assert len(await publish_and_claim(session, tenant, floor, n)) == 1
    assert floor.raised >= 1  # as soon as ids come one at a time again


async def test_floor__a_transaction_still_open_holds_it_below_its_row(session, tenant_factory):
    tenant = await orm(tenant_factory, "acme")
    floor = ClaimFloor(full_scan_secs=1000.0, reading_secs=0.0)  # no full scan to catch a row the floor passed
    await publish_and_claim(session, tenant, floor, 0)
    store = get_store()
    held = await store.aopen_session()
    try:
        # A producer's transaction holds an outbox id and has not committed yet.
        shard = streams.shard_of(tenant.id, conf.SHARDS)
        await held.execute("BEGIN")
        payload = json.dumps({"held": True})
        cur = await held.execute(
            SQL["publish_one"],
            [tenant.id, tenant.id, "held-1", tenant.id, streams.tenant_stream(tenant.id), "a.b", timezone.now()]
            + [payload, len(payload), shard],
        )
        assert (await cur.fetchone()) == (True, 1)
        cur = await held.execute("SELECT max(id) FROM backplane_outboxitem WHERE event_id = 'held-1'")
        (held_id,) = await cur.fetchone()
        for n in range(1, ROUNDS):  # later events commit and are claimed around it
            assert len(await publish_and_claim(session, tenant, floor, n)) == 1
        assert floor.raised >= 1  # it moved (below the held row), and no further
        assert floor.after < held_id
        await held.execute("COMMIT")
    finally:
        await store.aclose_session(held)
    got = await get_store().aassign(session, [shard], 100, floor=floor)
    assert [p.item.event_id for p in got] == ["held-1"]


async def test_floor__a_row_below_it_is_claimed_by_the_next_full_scan(session, tenant_factory):
    tenant = await orm(tenant_factory, "acme")
    floor = ClaimFloor(full_scan_secs=1000.0, reading_secs=0.0)  # its full scan comes when the test says (below)
    cur = await session.execute("SELECT nextval(pg_get_serial_sequence('backplane_outboxitem', 'id'))")
    (reserved,) = await cur.fetchone()  # an outbox id nothing else will take
    for n in range(ROUNDS):
        await publish_and_claim(session, tenant, floor, n)
    assert floor.after > reserved
    # A row inserted outside the publish paths, with an id below the floor (what the floor's
    # reasoning cannot see: the full scan is its safety net).
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    await orm(
        OutboxItem.objects.create,
        id=reserved,
        tenant_id=tenant.id,
        kind="event",
        stream=streams.tenant_stream(tenant.id),
        event_id=str(uuid.uuid4()),
        type="a.late",
        occurred_at=timezone.now(),
        payload={},
        payload_bytes=2,
        shard=shard,
    )
    late: list[Any] = []
    for _ in range(3):  # within the full-scan period: the claim starts above the floor
        late += await get_store().aassign(session, [shard], 100, floor=floor)
    assert [p.item.type for p in late] == []
    floor.full_scan_at = 0.0  # the period is over
    got = await get_store().aassign(session, [shard], 100, floor=floor)
    assert [p.item.type for p in got] == ["a.late"]
