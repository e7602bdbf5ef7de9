"""Shard leases on PostgreSQL advisory locks: one owner per shard; a standby takes over."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.db import connection
from psycopg import _pipeline_base as psycopg_pipeline

from backplane import hoptrace, leases, outbox, streams
from backplane.conf import conf
from backplane.leases import Leases
from backplane.models import OutboxItem, RelayLease
from backplane.store import Item, Pending, get_store
from backplane.store.postgresql import SQL, _statement

from .helpers import eventually, orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SHARDS = [0, 1, 2, 3]


@pytest.fixture
async def make_leases(services: None, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    # Take-over attempts every 50 ms instead of every second keeps the waits short.
    monkeypatch.setattr(leases, "ACQUIRE_INTERVAL_SECS", 0.05)
    made: list[Leases] = []

    def make(wanted: list[int], holder: str) -> Leases:
        made.append(Leases(wanted, holder))
        return made[-1]

    yield make
    for lease in made:
        await lease.release()


async def owned_by_both(a: Leases, b: Leases, rounds: int = 10) -> set[int]:
    overlap: set[int] = set()
    for _ in range(rounds):
        got_a, got_b = await asyncio.gather(a.current(), b.current())
        overlap |= set(got_a) & set(got_b)
        await asyncio.sleep(0.06)
    return overlap


def terminate_backend(pid: int) -> bool:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [pid])
        return bool(cur.fetchone()[0])


def claim_query(shard: int, limit: int, after: int = 0) -> str:
    """What ``aassign`` sends for a claim without marks and without a claim floor."""
    return _statement(SQL["assign"], [[shard], limit, None, [], after])


def record_statements(conn: Any) -> list[str]:
    """Record the text of every statement run on a psycopg connection from now on."""
    statements: list[str] = []
    real = conn.execute

    async def recording(sql: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(str(sql))
        return await real(sql, *args, **kwargs)

    conn.execute = recording
    return statements


async def explain_everything(conn: Any) -> list[str]:
    """From now on, the analyzed plan of every statement run on ``conn``, also those inside
    functions (``auto_explain``, sent to the client as notices), collected in the list."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    for setting in (
        "LOAD 'auto_explain'",
        "SET auto_explain.log_min_duration = 0",
        "SET auto_explain.log_nested_statements = on",
        "SET auto_explain.log_level = notice",
        "SET auto_explain.log_analyze = on",
    ):
        await conn.execute(setting)
    return notices


async def test_leases__first_takes_all_second_none(make_leases):
    a, b = make_leases(SHARDS, "relay-a"), make_leases(SHARDS, "relay-b")

    assert await a.current() == SHARDS
    assert await b.current() == []
    assert await owned_by_both(a, b) == set()
    assert await a.current() == SHARDS
    assert await b.current() == []


async def test_leases__overlapping_wants_never_shared(make_leases):
    a, b = make_leases([0, 1, 2], "relay-a"), make_leases([1, 2, 3, 4], "relay-b")

    assert await a.current() == [0, 1, 2]
    assert await b.current() == [3, 4]
    assert await owned_by_both(a, b) == set()


async def test_leases__standby_takes_over_after_release(make_leases):
    a, b = make_leases(SHARDS, "relay-a"), make_leases(SHARDS, "relay-b")
    assert await a.current() == SHARDS
    assert await b.current() == []

    await a.release()

    assert await eventually(b.current) == SHARDS
    assert a.owned == set()


async def test_leases__standby_takes_over_when_session_dies(make_leases):
    a, b = make_leases(SHARDS, "relay-a"), make_leases(SHARDS, "relay-b")
    assert await a.current() == SHARDS
    assert await b.current() == []

    # The lock session dies (relay crashed, or its connection was cut): PostgreSQL frees the locks.
    assert await orm(terminate_backend, a._conn.info.backend_pid)

    assert await eventually(b.current) == SHARDS
    # The old holder notices its dead session and owns nothing while b holds the shards.
    assert await a.current() == []
    assert await owned_by_both(a, b) == set()


async def test_leases__reported_in_relay_lease_rows(make_leases):
    a = make_leases([2, 5], "relay-a")

    assert await a.current() == [2, 5]
    rows = await orm(lambda: dict(RelayLease.objects.values_list("shard", "holder")))
    assert rows == {2: "relay-a", 5: "relay-a"}

    await a.release()
    rows = await orm(lambda: dict(RelayLease.objects.values_list("shard", "holder")))
    assert rows == {2: "", 5: ""}


async def test_relay__lost_lease_session_forwards_nothing(make_leases, make_relay, tenant_factory):
    relay = make_relay()
    assert await relay.cycle() == (0, 0)
    assert relay.leases.owned == set(range(conf.SHARDS))
    standby = make_leases(list(range(conf.SHARDS)), "standby")
    tenant = await orm(tenant_factory, "acme")
    await orm(outbox.publish, tenant, "run.updated", {}, event_id="e-1")

    assert await orm(terminate_backend, relay.leases._conn.info.backend_pid)
    assert await eventually(standby.current) == list(range(conf.SHARDS))

    assert await relay.cycle() == (0, 0)
    assert await orm(lambda: list(OutboxItem.objects.values_list("stream_offset", "forwarded_at"))) == [(None, None)]


async def test_relay__lost_session_drops_the_marks_it_held_and_close_writes_them(
    make_leases, make_relay, tenant_factory
):
    """Rows sent but not marked are marked when the relay closes; when its session dies
    first, they are left to the next owner (sent again), and the dead relay forgets them."""
    tenant = await orm(tenant_factory, "acme")
    closing = make_relay()
    await orm(outbox.publish, tenant, "run.updated", {}, event_id="e-1")
    assert await closing.cycle() == (1, 1) and len(closing.unmarked) == 1
    await closing.aclose()
    assert await orm(lambda: OutboxItem.objects.filter(forwarded_at__isnull=True).count()) == 0

    dying = make_relay()
    await orm(outbox.publish, tenant, "run.updated", {}, event_id="e-2")
    assert await dying.cycle() == (1, 1) and len(dying.unmarked) == 1
    assert await orm(terminate_backend, dying.leases._conn.info.backend_pid)
    assert await dying.cycle() == (0, 0)  # its session is gone: nothing assigned, nothing marked
    assert dying.unmarked == [] and not dying.leases.owned
    rows = await orm(lambda: dict(OutboxItem.objects.values_list("event_id", "forwarded_at")))
    assert rows["e-1"] is not None and rows["e-2"] is None  # e-2 goes again with the next owner


async def test_leases__session_finds_rows_by_index_and_flushes_only_the_assignment(make_leases, tenant_factory):
    """The relay's session plans without sequential scans and commits without waiting for
    the WAL flush — but the assignment (offsets must be durable before they are sent)."""
    tenant = await orm(tenant_factory, "acme")
    a = make_leases(SHARDS, "relay-a")
    assert await a.current() == SHARDS
    shown = {}
    for name in ("enable_seqscan", "synchronous_commit"):
        cur = await a.conn.execute(f"SHOW {name}")
        shown[name] = (await cur.fetchone())[0]
    assert shown == {"enable_seqscan": "off", "synchronous_commit": "off"}

    statements = record_statements(a.conn)
    await orm(outbox.publish, tenant, "a.b", {"n": 1})
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    assert len(await get_store().aassign(a.conn, [shard], 100)) == 1
    # alone, in autocommit: its own transaction
    assert statements == [claim_query(shard, 100)]
    # The call sets synchronous_commit on for the transaction it runs in (what follows it up to
    # the sync is that transaction, and its commit waits for the flush); the session keeps off.
    await orm(outbox.publish, tenant, "a.b", {"n": 2})
    query = _statement(SQL["assign"], [[shard], 100, None, [], 0]) + ";\nSELECT current_setting('synchronous_commit')"
    cur = await a.conn.execute(query, prepare=False)  # as aassign sends it, with its marks
    assert len(await cur.fetchall()) == 1
    assert cur.nextset()
    assert (await cur.fetchone())[0] == "on"
    cur = await a.conn.execute("SHOW synchronous_commit")
    assert (await cur.fetchone())[0] == "off"


async def test_assign__one_round_trip_and_offsets_written_by_primary_key(make_leases, tenant_factory, monkeypatch):
    """The assignment is one call (bp_assign_v4, with the marks pipelined after it); inside it, the rows
    get their offsets through their partition's primary key, and nothing else of the outbox is
    read — never a whole partition, which the planner chooses for a few hundred keys when it
    may, or whenever it believes a partition empty."""
    tenant = await orm(tenant_factory, "acme")
    a = make_leases(SHARDS, "relay-a")
    assert await a.current() == SHARDS

    def backlog() -> None:
        # A partition with 4 000 rows, 1 000 of them unassigned, and fresh statistics.
        for start in range(0, 4_000, 2_000):
            outbox.publish_many(
                tenant,
                [{"type": "a.b", "payload": {"n": n}, "device": f"d-{n % 500}"} for n in range(start, start + 2_000)],
            )
        with connection.cursor() as cur:
            cur.execute(
                "UPDATE backplane_outboxitem SET stream_offset = 0 WHERE id NOT IN "
                "(SELECT id FROM backplane_outboxitem ORDER BY id DESC LIMIT 1000)"
            )
            cur.execute("VACUUM ANALYZE backplane_outboxitem")

    await orm(backlog)
    notices = await explain_everything(a.conn)
    statements = record_statements(a.conn)
    syncs = 0
    enqueue_sync = psycopg_pipeline.BasePipeline._enqueue_sync

    def counting(pipeline: Any) -> None:
        nonlocal syncs
        syncs += 1
        enqueue_sync(pipeline)

    monkeypatch.setattr(psycopg_pipeline.BasePipeline, "_enqueue_sync", counting)
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    marked = await get_store().aassign(a.conn, [shard], 1)  # to carry its mark below
    statements.clear()
    notices.clear()
    got = await get_store().aassign(a.conn, [shard], 999, forwarded=marked)
    assert len(got) == 999
    # One transaction: the call, then the marks, in one simple query (one execute, no pipeline).
    assert statements == [
        claim_query(shard, 999)
        + ";\n"
        + _statement(SQL["mark_forwarded"].format(part=marked[0].part), [[marked[0].id]])
    ]
    assert "bp_assign_v4(" in SQL["assign"]
    assert syncs == 0
    rows = await orm(lambda: dict(OutboxItem.objects.filter(id=marked[0].id).values_list("id", "forwarded_at")))
    assert rows[marked[0].id] is not None  # the mark went with it
    updates = [n for n in notices if "SET stream_offset" in n]
    assert updates, notices
    (plan,) = updates
    # Only the 999 claimed rows are read from the outbox (3 001 more sit in the partition).
    assert outbox_rows_read(plan) == 999, plan


async def test_assign__traced_in_an_explicit_transaction_returns_rows_marks_and_the_clock(
    make_leases, tenant_factory, monkeypatch
):
    """With the hop trace on, the call and the marks run between BEGIN and COMMIT with a clock
    reading before the COMMIT (bench/hop_trace.py); the rows, the marks and the reading come
    back from the one query, and the session is left idle."""
    tenant = await orm(tenant_factory, "acme")
    a = make_leases(SHARDS, "relay-a")
    assert await a.current() == SHARDS
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    await orm(outbox.publish, tenant, "a.b", {"n": 1})
    store = get_store()
    marked = await store.aassign(a.conn, [shard], 10)
    await orm(outbox.publish, tenant, "a.b", {"n": 2})
    monkeypatch.setattr(hoptrace, "ON", True)
    store.statements_done_at = 0.0

    got = await store.aassign(a.conn, [shard], 10, forwarded=marked)

    assert [p.item.offset for p in got] == [marked[0].item.offset + 1]
    assert abs(store.statements_done_at - time.time()) < 60
    assert a.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    rows = await orm(lambda: dict(OutboxItem.objects.values_list("id", "forwarded_at")))
    assert rows[marked[0].id] is not None and rows[got[0].id] is None


async def test_assign__marks_that_fail_take_the_call_with_them(make_leases, tenant_factory):
    """The call and the marks are one transaction: when the marks fail, no offset is kept
    (the rows are assigned again by the next call), and the session is usable at once."""
    tenant = await orm(tenant_factory, "acme")
    a = make_leases(SHARDS, "relay-a")
    assert await a.current() == SHARDS
    shard = streams.shard_of(tenant.id, conf.SHARDS)
    await orm(outbox.publish, tenant, "a.b", {"n": 1})
    gone = Pending(1, "event", "x", "e", shard, Item(1, "e-x", "a.b", "", "{}"), None, "backplane_no_such_part")

    with pytest.raises(psycopg.errors.UndefinedTable):
        await get_store().aassign(a.conn, [shard], 10, forwarded=[gone])

    assert a.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    (row,) = await get_store().aassign(a.conn, [shard], 10)
    assert row.item.offset == 1


@pytest.fixture
def autovacuum() -> Iterator[Callable[[bool], None]]:
    """Switch autovacuum of the outbox's partitions; back on after the test."""

    def switch(on: bool) -> None:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'backplane_outboxitem'::regclass"
            )
            for (part,) in cur.fetchall():
                cur.execute(f"ALTER TABLE {part} SET (autovacuum_enabled = {'on' if on else 'off'})")

    yield switch
    switch(True)


def partition_of(row_id: int) -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT tableoid::regclass::text FROM backplane_outboxitem WHERE id = %s", [row_id])
        return cur.fetchone()[0]


def outbox_rows_read(plan: str) -> int:
    """The outbox rows an analyzed UPDATE plan read, after checking it read them only through
    a partition's primary key with the claimed ids as the index condition."""
    lines = plan.splitlines()
    scans = [
        n
        for n, line in enumerate(lines)
        if ("Index Scan using" in line and "_pkey on backplane_outboxitem" in line)
        or ("Bitmap Index Scan on backplane_outboxitem" in line and "_pkey " in line)
    ]
    assert scans and "Seq Scan" not in plan and "Rows Removed by Filter" not in plan, plan
    for n in scans:
        assert "Index Cond: ((id = ANY" in lines[n + 1] or "Index Cond: (id = ANY" in lines[n + 1], plan
    found = [re.search(r"actual time=\S+ rows=(\d+) loops=(\d+)\)", lines[n]) for n in scans]
    return sum(int(m.group(1)) * int(m.group(2)) for m in found if m)  # "never executed": none


async def test_assign__a_plan_made_on_an_empty_partition_still_reads_only_the_claimed_rows(
    make_leases, tenant_factory, autovacuum
):
    """The relay's session keeps bp_assign_v4's plans. Made while the partition was analyzed
    empty (a new partition), a plan that trusted that would read the whole partition on every
    call as it filled: the 3 001st row's assignment must read one row, not 3 001."""
    tenant = await orm(tenant_factory, "acme")
    a = make_leases(SHARDS, "relay-a")
    assert await a.current() == SHARDS

    def analyze_empty() -> None:
        with connection.cursor() as cur:
            cur.execute("VACUUM ANALYZE backplane_outboxitem")

    def fill(n: int) -> None:
        outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": i}, "device": f"d-{i % 50}"} for i in range(n)])

    shard = [streams.shard_of(tenant.id, conf.SHARDS)]
    # No autovacuum ANALYZE of the filling partition meanwhile: it would make the plans afresh.
    await orm(autovacuum, False)
    await orm(analyze_empty)
    await orm(fill, 1)
    assert len(await get_store().aassign(a.conn, shard, 1000)) == 1  # plans made now
    await orm(fill, 3000)
    notices = await explain_everything(a.conn)
    for _ in range(3):
        assert len(await get_store().aassign(a.conn, shard, 1000)) == 1000
    # 1 000 rows of 50 streams meet their heads by a hash join, not n × n in a nested loop.
    claims = [n for n in notices if "FOR UPDATE" in n and "Query Text: WITH claimed" in n]
    assert len(claims) == 3 and all("Hash Join" in c and "Nested Loop" not in c for c in claims), claims[0]
    await orm(fill, 1)
    notices.clear()

    (row,) = await get_store().aassign(a.conn, shard, 1000)

    assert row.part == await orm(partition_of, row.id)  # where the forwarded mark will go

    (plan,) = [n for n in notices if "SET stream_offset" in n]
    assert outbox_rows_read(plan) == 1, plan
    (claim,) = [n for n in notices if "FOR UPDATE" in n and "Query Text: WITH claimed" in n]
    assert "Seq Scan" not in claim and "Index Scan using" in claim, claim  # in id order, by the claim index


def test_write_rows__one_upsert_keeps_acquired_at_adds_counts_and_follows_holders(services):
    leases._write_rows([0, 1, 2], "relay-a", {1: 5}, [0, 1, 2])
    first = {r.shard: r for r in RelayLease.objects.all()}
    leases._write_rows([0, 1, 2], "relay-a", {1: 2, 2: 1}, [])
    leases._write_rows([1], "relay-b", {}, [])
    rows = {r.shard: r for r in RelayLease.objects.all()}
    assert {s: (r.holder, r.forwarded_total) for s, r in rows.items()} == {
        0: ("relay-a", 0),
        1: ("relay-b", 7),
        2: ("relay-a", 1),
    }
    assert rows[0].acquired_at == first[0].acquired_at  # same holder, not just taken: kept
    assert rows[2].acquired_at == first[2].acquired_at
    assert rows[1].acquired_at > first[1].acquired_at  # a new holder
    assert rows[0].last_forwarded_at is None and rows[2].last_forwarded_at is not None
    assert rows[1].heartbeat_at > first[1].heartbeat_at
    leases._write_rows([0], "relay-a", {}, [0])  # taken again: acquired now
    assert RelayLease.objects.get(shard=0).acquired_at > first[0].acquired_at
