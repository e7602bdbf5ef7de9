"""Compaction rules beyond age (issue 3): the window's edge, row and byte budgets, the
unforwarded-row guard, one compactor at a time, stream pruning, sweeps and idempotency keys.

Rows are aged by moving ``created_at`` back with the database clock; "oldest" means lowest id.
"""

from __future__ import annotations

import io
import subprocess
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.test import override_settings
from django.utils import timezone

from backplane import outbox, retention, streams
from backplane.conf import conf
from backplane.models import Connection, Edge, EventKey, OutboxItem, RelayLease, Stream
from backplane.store import EVENTKEY, OUTBOX, STREAM, get_store, postgresql
from harness.env import child_env
from harness.procs import PYTHON, ROOT

from .helpers import orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HOUR = 3600.0
DAY = 24 * HOUR
ALL_SHARDS = list(range(16))


# --- helpers ------------------------------------------------------------------------------


def payload_of(size: int) -> dict[str, str]:
    """A payload whose compact JSON is exactly ``size`` bytes (``{"p":"…"}`` is 8 + n)."""
    assert size >= 8
    return {"p": "x" * (size - 8)}


def seed(tenant, names: list[str], *, size: int = 100, forwarded: bool = True, **audience) -> list[str]:
    """Publish one event per name (event id = name), assign offsets, optionally forward them."""
    outbox.publish_many(tenant, [{"type": "run.updated", "payload": payload_of(size), "event_id": n, **audience}
                                 for n in names])
    get_store().assign(list(range(conf.SHARDS)), 10_000)
    if forwarded:
        forward(names)
    return names


def forward(names: list[str]) -> None:
    get_store().mark_forwarded(list(OutboxItem.objects.filter(event_id__in=names).values_list("id", flat=True)))


def age(names: list[str], secs: float) -> None:
    """Make rows ``secs`` old by the database clock."""
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {OUTBOX} SET created_at = now() - make_interval(secs => %s) WHERE event_id = ANY(%s)",
            [secs, names],
        )


def remaining() -> list[str]:
    return list(OutboxItem.objects.order_by("id").values_list("event_id", flat=True))


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def counts(result: retention.CompactionResult) -> dict[str, int]:
    return {k: v for k, v in result.by_rule.items() if k != "partitions"}


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


# --- the window's edge --------------------------------------------------------------------


def test_compact__retention_boundary_inside_kept_outside_deleted(tenant):
    seed(tenant, ["in-far", "in-near", "out-near", "out-far"])
    # The compactor reads now() a moment after these updates: 20 s either side stays on its side.
    age(["in-far"], HOUR - 600)
    age(["in-near"], HOUR - 20)
    age(["out-near"], HOUR + 20)
    age(["out-far"], HOUR + 600)

    result = retention.compact(HOUR)

    assert remaining() == ["in-far", "in-near"]
    assert (result.deleted, counts(result)) == (2, {"age": 2, "rows": 0, "bytes": 0})


def test_compact__boundary_moves_with_the_retention_argument(tenant):
    seed(tenant, names("r", 4))
    for i, secs in enumerate((100, 200, 300, 400)):
        age([f"r{i}"], secs)

    assert retention.compact(450).deleted == 0
    assert retention.compact(250).deleted == 2
    assert remaining() == ["r0", "r1"]
    assert retention.compact(150).deleted == 1
    assert remaining() == ["r0"]


def test_compact__uses_the_database_clock_not_the_app_clock(tenant, monkeypatch):
    seed(tenant, ["old", "new"])
    age(["old"], 2 * HOUR)
    # An app clock a day ahead must not make fresh rows look expired.
    ahead = timezone.now() + timedelta(days=1)
    monkeypatch.setattr(retention.timezone, "now", lambda: ahead)

    result = retention.compact(HOUR)

    assert remaining() == ["new"]
    assert result.deleted == 1


# --- budgets ------------------------------------------------------------------------------


def test_compact__row_budget_deletes_oldest_forwarded_down_to_budget(tenant):
    seed(tenant, ["u0"], forwarded=False)  # the oldest row, never forwarded
    seed(tenant, names("f", 10))
    seed(tenant, ["u1"], forwarded=False)

    result = retention.compact(DAY, max_rows=5)

    assert remaining() == ["u0", "f7", "f8", "f9", "u1"]
    assert (result.deleted, counts(result)) == (7, {"age": 0, "rows": 7, "bytes": 0})
    assert result.deleted_bytes == 700


def test_compact__row_budget_never_takes_unforwarded_rows(tenant):
    seed(tenant, names("f", 2))
    seed(tenant, names("u", 6), forwarded=False)

    result = retention.compact(DAY, max_rows=3)

    assert remaining() == names("u", 6)  # still over the budget: what is left is unforwarded
    assert result.by_rule["rows"] == 2


def test_compact__row_budget_inside_budget_deletes_nothing(tenant):
    seed(tenant, names("f", 5))

    assert retention.compact(DAY, max_rows=5).deleted == 0
    assert len(remaining()) == 5


@pytest.mark.parametrize("batch_size", [2, 5000])
@pytest.mark.parametrize(("max_bytes", "taken"), [(650, 5), (600, 5), (599, 6), (1100, 0)])
def test_compact__byte_budget_deletes_oldest_forwarded_just_enough(tenant, batch_size, max_bytes, taken):
    seed(tenant, ["u0"], forwarded=False)
    seed(tenant, names("f", 10))  # 11 rows of 100 bytes: 1100 bytes

    result = retention.compact(DAY, max_bytes=max_bytes, batch_size=batch_size)

    # The fewest oldest forwarded rows that bring 1100 bytes to the budget or below.
    assert remaining() == ["u0", *names("f", 10)[taken:]]
    assert (result.by_rule["bytes"], result.deleted_bytes) == (taken, 100 * taken)


def test_compact__byte_budget_never_takes_unforwarded_rows(tenant):
    seed(tenant, names("f", 2), size=1000)
    seed(tenant, names("u", 3), size=1000, forwarded=False)

    result = retention.compact(DAY, max_bytes=100)

    assert remaining() == names("u", 3)
    assert result.deleted_bytes == 2000


def test_compact__rules_apply_in_order_age_then_rows_then_bytes(tenant):
    seed(tenant, names("a", 3), size=100)
    seed(tenant, names("b", 6), size=200)
    age(names("a", 3), 2 * DAY)

    # After age (3 rows): 6 rows, 1200 bytes. Row budget 5 takes b0; byte budget 700 then
    # takes b1, b2 (1000 -> 600).
    result = retention.compact(DAY, max_rows=5, max_bytes=700)

    assert remaining() == ["b3", "b4", "b5"]
    assert counts(result) == {"age": 3, "rows": 1, "bytes": 2}
    assert (result.deleted, result.deleted_bytes) == (6, 300 + 200 + 400)


def budget_scenario(tenant) -> None:
    """Forwarded and unforwarded rows of mixed sizes, some aged past a one-day window."""
    seed(tenant, names("a", 4), size=150)
    seed(tenant, ["ua"], size=150, forwarded=False)
    seed(tenant, names("b", 8), size=90)
    seed(tenant, names("c", 5), size=300, role="node")
    seed(tenant, ["ub"], size=50, forwarded=False)
    age([*names("a", 4), "ua"], 2 * DAY)


@pytest.mark.parametrize(
    "budgets",
    [{}, {"max_rows": 10}, {"max_bytes": 1500}, {"max_rows": 1, "max_bytes": 1}],
    ids=["age", "rows", "bytes", "everything"],
)
def test_compact__dry_run_reports_the_counts_the_real_run_deletes(tenant, budgets):
    budget_scenario(tenant)
    before = remaining()

    dry = retention.compact(DAY, dry_run=True, **budgets)

    assert remaining() == before
    assert dry.batches == 0 and dry.dry_run
    real = retention.compact(DAY, **budgets)
    assert (dry.deleted, counts(dry), dry.unforwarded_expired) == (real.deleted, counts(real), real.unforwarded_expired)
    assert real.deleted > 0
    assert dry.summary().startswith(f"would delete {real.deleted} rows")


def test_compact__dry_run_counts_with_row_and_byte_budgets_together(tenant):
    budget_scenario(tenant)

    dry = retention.compact(DAY, dry_run=True, max_rows=12, max_bytes=900)
    real = retention.compact(DAY, max_rows=12, max_bytes=900)

    # Real run: age 4; rows 15 -> 12 takes b0-b2 (270 B); bytes 2150 -> <= 900 takes b3-b7, c0-c2.
    assert counts(real) == {"age": 4, "rows": 3, "bytes": 8}
    assert (dry.deleted, counts(dry)) == (real.deleted, counts(real))


def test_compact__dry_run_reports_the_payload_bytes_it_would_remove(tenant):
    budget_scenario(tenant)

    dry = retention.compact(DAY, dry_run=True, max_bytes=1500)
    real = retention.compact(DAY, max_bytes=1500)

    assert dry.deleted_bytes == real.deleted_bytes > 0


def test_compact__dry_run_byte_plan_when_aged_rows_are_not_the_oldest_ids(tenant):
    # A long producer transaction: its row has an old created_at and a high id.
    seed(tenant, ["big"], size=1000)
    seed(tenant, names("s", 4), size=10)
    seed(tenant, ["late"], size=10)
    age(["late"], 2 * DAY)

    dry = retention.compact(DAY, dry_run=True, max_bytes=100)
    real = retention.compact(DAY, max_bytes=100)

    assert remaining() == names("s", 4)  # age takes "late", the byte budget takes "big": 40 bytes left
    assert (dry.deleted, counts(dry)) == (real.deleted, counts(real)) == (2, {"age": 1, "rows": 0, "bytes": 1})


def test_compact_outbox__budgets_from_the_command_line(tenant):
    seed(tenant, names("f", 10))
    out = io.StringIO()

    call_command("compact_outbox", "--dry-run", "--max-rows", "4", stdout=out)
    assert out.getvalue().startswith("would delete 6 rows")
    call_command("compact_outbox", "--dry-run", "--max-bytes", "300", stdout=out)
    assert out.getvalue().splitlines()[-1].startswith("would delete 7 rows")
    assert len(remaining()) == 10
    call_command("compact_outbox", "--max-rows", "4", "--max-bytes", "300", stdout=out)

    assert remaining() == ["f7", "f8", "f9"]
    assert "deleted 7 rows (700 payload bytes; rows 6, bytes 1)" in out.getvalue()


def test_compact__budgets_default_from_settings(tenant):
    seed(tenant, names("f", 6))

    with override_settings(BACKPLANE={"COMPACT_MAX_ROWS": 2, "COMPACT_MAX_BYTES": 150}):
        result = retention.compact(DAY)

    assert remaining() == ["f5"]
    assert counts(result) == {"age": 0, "rows": 4, "bytes": 1}


# --- the unforwarded guard ----------------------------------------------------------------


def test_compact__unforwarded_past_retention_kept_counted_with_age(tenant):
    seed(tenant, ["u-old", "u-older"], forwarded=False)
    outbox.publish(tenant, "run.updated", {}, event_id="unassigned")  # no offset yet either
    seed(tenant, ["f-old"])
    age(["u-old", "f-old"], 2 * DAY)
    age(["u-older"], 3 * DAY)
    age(["unassigned"], 4 * DAY)

    result = retention.compact(HOUR)

    assert remaining() == ["u-old", "u-older", "unassigned"]
    assert (result.deleted, result.unforwarded_expired) == (1, 3)
    assert 4 * DAY - 60 < result.oldest_unforwarded_age_secs < 4 * DAY + 60
    assert f"kept 3 unforwarded rows past retention (oldest {result.oldest_unforwarded_age_secs:.0f}s)" \
        in result.summary()


def test_compact__unforwarded_guard_reported_by_the_command(tenant):
    seed(tenant, ["u"], forwarded=False)
    age(["u"], 2 * DAY)
    out = io.StringIO()

    call_command("compact_outbox", "--retention", "1d", stdout=out)

    line = out.getvalue().strip().splitlines()[-1]
    assert line.startswith("deleted 0 rows")
    assert "kept 1 unforwarded rows past retention (oldest 1728" in line  # 172800 s, give or take
    assert remaining() == ["u"]


def test_compact__forwarded_later_is_compacted_on_the_next_run(tenant):
    seed(tenant, ["u"], forwarded=False)
    age(["u"], 2 * DAY)
    assert retention.compact(HOUR).unforwarded_expired == 1

    forward(["u"])
    result = retention.compact(HOUR)

    assert (result.deleted, result.unforwarded_expired, remaining()) == (1, 0, [])


# --- one compactor at a time --------------------------------------------------------------


def hold_compactor_lock() -> psycopg.Connection:
    """Take the compactor's advisory lock on a separate session, as another compactor would."""
    db = connection.settings_dict
    conn = psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"] or "postgres",
                           dbname=db["NAME"], autocommit=True)
    got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", [postgresql.LOCK_CLASS, postgresql.COMPACTOR_LOCK])
    assert got.fetchone()[0]
    return conn


def test_compact__skipped_while_another_compactor_holds_the_lock(tenant):
    seed(tenant, names("f", 3))
    age(names("f", 3), 2 * DAY)
    other = hold_compactor_lock()
    try:
        result = retention.compact(HOUR)
        out = io.StringIO()
        call_command("compact_outbox", "--retention", "1h", stdout=out)
    finally:
        other.close()

    assert result.skipped and result.deleted == 0
    assert out.getvalue().strip() == "another compactor holds the lock; nothing done"
    assert len(remaining()) == 3
    # The lock dies with the other session; the server releases it a moment after the client
    # has closed (bounded wait: a loaded machine may take a few hundred ms).
    again = retention.compact(HOUR)
    for _ in range(50):
        if not again.skipped:
            break
        time.sleep(0.1)
        again = retention.compact(HOUR)
    assert again.deleted == 3


def test_compact__lock_released_after_a_failed_run(tenant, monkeypatch):
    seed(tenant, names("f", 3))
    age(names("f", 3), 2 * DAY)

    def boom(result):
        raise RuntimeError("sweep failed")

    monkeypatch.setattr(retention, "_sweep", boom)
    with pytest.raises(RuntimeError):
        retention.compact(HOUR)
    monkeypatch.undo()
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert cur.fetchone()[0] == 0

    assert not retention.compact(HOUR).skipped


def test_compact__two_threads_at_once_delete_each_row_once(tenant):
    gone = [f"g{i}" for i in range(1200)]
    outbox.publish_many(tenant, [{"type": "run.updated", "payload": {}, "event_id": n} for n in gone])
    get_store().assign(list(range(conf.SHARDS)), 10_000)
    forward(gone)
    age(gone, 2 * DAY)
    keep = seed(tenant, names("k", 5))
    barrier = threading.Barrier(2)
    results: list[retention.CompactionResult] = []
    errors: list[BaseException] = []

    def compactor() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(retention.compact(HOUR, batch_size=50))  # ~24 batches: long enough to overlap
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=compactor) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert not errors and len(results) == 2
    assert sum(r.deleted for r in results) == 1200
    assert [r.skipped for r in results].count(False) >= 1
    assert remaining() == keep
    key = streams.tenant_stream(tenant.id)
    assert Stream.objects.get(key=key).first_retained_offset == 1201  # g0..g1199 took offsets 1..1200


def test_compact_outbox__two_processes_at_once(tenant):
    gone = [f"g{i}" for i in range(3000)]
    outbox.publish_many(tenant, [{"type": "run.updated", "payload": {}, "event_id": n} for n in gone])
    get_store().assign(list(range(conf.SHARDS)), 10_000)
    forward(gone)
    age(gone, 2 * DAY)
    env = child_env()
    args = [PYTHON, "manage.py", "compact_outbox", "--retention", "1h", "--batch-size", "100"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=90) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], [err[-1000:] for _, err in outs]
    lines = [out.strip().splitlines()[-1] for out, _ in outs]
    deleted = [int(line.split()[1]) for line in lines if line.startswith("deleted ")]
    skipped = [line for line in lines if line == "another compactor holds the lock; nothing done"]
    assert len(deleted) + len(skipped) == 2 and deleted, lines
    assert sum(deleted) == 3000
    assert remaining() == []


# --- first retained offset ----------------------------------------------------------------


def test_compact__first_retained_offset_per_stream(tenant):
    seed(tenant, names("t", 5))
    seed(tenant, names("d", 4), device="dev-1")
    seed(tenant, names("n", 3), role="node")
    age(["t0", "t1", "t2", "d0"], 2 * DAY)

    retention.compact(DAY)

    first = dict(Stream.objects.values_list("key", "first_retained_offset"))
    assert first == {
        streams.tenant_stream(tenant.id): 4,
        streams.device_stream(tenant.id, "dev-1"): 2,
        streams.role_stream(tenant.id, "node"): 1,
    }
    heads = get_store().stream_heads(list(first))
    for key, offset in first.items():  # every offset from the first retained one to the head is there
        got = [i.offset for i in get_store().read_range(key, offset - 1, heads[key].offset)]
        assert got == list(range(offset, heads[key].offset + 1))


def test_compact__budget_deletions_raise_first_retained_offset(tenant):
    seed(tenant, names("t", 6))

    retention.compact(DAY, max_rows=2)

    key = streams.tenant_stream(tenant.id)
    assert Stream.objects.get(key=key).first_retained_offset == 5
    assert [i.offset for i in get_store().read_range(key, 4, 6)] == [5, 6]


# --- idle streams -------------------------------------------------------------------------


def idle(keys: list[str], secs: float = 3600) -> None:
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {STREAM} SET updated_at = now() - make_interval(secs => %s) WHERE key = ANY(%s)",
            [secs, keys],
        )


def live_connection(tenant, device: str, role: str = "client", *, expires_in: float = 60) -> Connection:
    edge, _ = Edge.objects.get_or_create(edge_id="edge-test")
    return Connection.objects.create(connection_id=f"c-{device}", tenant=tenant, device_id=device, role=role,
                                     edge=edge, channel_name=f"chan-{device}",
                                     expires_at=timezone.now() + timedelta(seconds=expires_in))


@override_settings(BACKPLANE={"STREAM_PRUNE_GRACE_SECS": 60})
def test_compact__prunes_idle_empty_streams_after_the_grace(tenant):
    seed(tenant, ["gone-1"], device="dev-gone")
    seed(tenant, ["gone-2"], device="dev-recent")
    seed(tenant, ["kept"], device="dev-rows")
    seed(tenant, ["live"], device="dev-live")
    live_connection(tenant, "dev-live")
    gone, recent, rows, live = (streams.device_stream(tenant.id, d)
                                for d in ("dev-gone", "dev-recent", "dev-rows", "dev-live"))
    with connection.cursor() as cur:
        cur.execute(f"DELETE FROM {OUTBOX} WHERE event_id IN ('gone-1', 'gone-2', 'live')")
    idle([gone, rows, live], 120)
    idle([recent], 30)

    result = retention.compact(DAY)

    assert result.streams_pruned == 1
    assert set(Stream.objects.filter(audience="device").values_list("key", flat=True)) == {recent, rows, live}


def test_compact__idle_streams_are_found_by_the_moved_index_not_a_scan(tenant):
    seed(tenant, ["d"], device="dev-1")
    with connection.cursor() as cur:
        cur.execute("SET enable_seqscan = off")  # a scan only where no index serves
        try:
            plan = retention.idle_streams(timezone.now()).explain()
        finally:
            cur.execute("RESET enable_seqscan")
    assert "bp_stream_moved" in plan, plan


@override_settings(BACKPLANE={"STREAM_PRUNE_GRACE_SECS": 60})
def test_compact__live_connection_keeps_its_tenant_role_and_device_streams(tenant):
    seed(tenant, ["t"])
    seed(tenant, ["r"], role="client")
    seed(tenant, ["d"], device="dev-1")
    seed(tenant, ["n"], role="node")
    live_connection(tenant, "dev-1", "client")
    age(["t", "r", "d", "n"], 2 * DAY)
    idle(list(Stream.objects.values_list("key", flat=True)), 120)

    result = retention.compact(DAY)

    assert result.deleted == 4
    assert result.streams_pruned == 1
    assert set(Stream.objects.values_list("key", flat=True)) == set(
        streams.connection_streams(tenant.id, "client", "dev-1").values())


@override_settings(BACKPLANE={"STREAM_PRUNE_GRACE_SECS": 60})
def test_compact__expired_connection_does_not_keep_streams(tenant):
    seed(tenant, ["d"], device="dev-1")
    live_connection(tenant, "dev-1", expires_in=-1)
    age(["d"], 2 * DAY)
    idle(list(Stream.objects.values_list("key", flat=True)), 120)

    result = retention.compact(DAY)

    assert (result.connections_swept, result.streams_pruned) == (1, 1)
    assert not Stream.objects.exists()


@override_settings(BACKPLANE={"STREAM_PRUNE_GRACE_SECS": 60})
async def test_compact__recreated_stream_gets_a_new_epoch(tenant_factory, make_relay):
    tenant = await orm(tenant_factory, "acme")
    key = streams.device_stream(tenant.id, "dev-1")
    await orm(outbox.publish, tenant, "run.updated", {}, device="dev-1", event_id="first")
    relay_ = make_relay()
    assert await relay_.cycle() == (1, 1)
    await relay_.flush_marks()
    before = await orm(Stream.objects.get, key=key)
    await orm(age, ["first"], 2 * DAY)
    await orm(idle, [key], 120)

    result = await orm(retention.compact, DAY)

    assert (result.deleted, result.streams_pruned) == (1, 1)
    await orm(outbox.publish, tenant, "run.updated", {}, device="dev-1", event_id="again")
    assert await relay_.cycle() == (1, 1)
    await relay_.flush_marks()
    after = await orm(Stream.objects.get, key=key)
    assert after.epoch != before.epoch
    assert (after.last_offset, after.first_retained_offset) == (1, 1)
    row = await orm(OutboxItem.objects.get, event_id="again")
    assert (row.stream_offset, row.forwarded_at is not None) == (1, True)


@override_settings(BACKPLANE={"STREAM_PRUNE_GRACE_SECS": 60})
def test_compact__prune_racing_a_relay_assignment_keeps_the_stream(tenant, monkeypatch):
    seed(tenant, ["old"], device="dev-1")
    key = streams.device_stream(tenant.id, "dev-1")
    age(["old"], 2 * DAY)
    retention.compact(DAY)  # the stream is now empty
    idle([key], 120)
    manager = Connection.objects
    real = manager.values_list

    def relay_runs_meanwhile(*args, **kwargs):
        # Between prune's SELECT and its DELETE a producer commits and a relay assigns offset 2.
        with transaction.atomic():
            outbox.publish(tenant, "run.updated", {}, device="dev-1", event_id="new")
        assert len(get_store().assign(list(range(conf.SHARDS)), 10)) == 1
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "values_list", relay_runs_meanwhile)
    retention.compact(DAY)
    monkeypatch.undo()

    pending = get_store().unforwarded(list(range(conf.SHARDS)), 10)
    assert [(p.stream, p.item.offset, p.item.event_id) for p in pending] == [(key, 2, "new")]


# --- sweeps -------------------------------------------------------------------------------


def test_compact__sweeps_expired_connections_dead_edges_and_stale_leases(tenant):
    now = timezone.now()
    alive = Edge.objects.create(edge_id="edge-alive")
    dead = Edge.objects.create(edge_id="edge-dead")
    Edge.objects.filter(edge_id="edge-dead").update(heartbeat_at=now - timedelta(seconds=conf.CONNECTION_TTL_SECS + 5))
    common = {"tenant": tenant, "role": "client", "channel_name": "c"}
    Connection.objects.create(connection_id="fresh", device_id="d1", edge=alive, expires_at=now + timedelta(seconds=60),
                              **common)
    Connection.objects.create(connection_id="expired", device_id="d2", edge=alive,
                              expires_at=now - timedelta(seconds=1), **common)
    Connection.objects.create(connection_id="on-dead-edge", device_id="d3", edge=dead,
                              expires_at=now + timedelta(seconds=60), **common)
    RelayLease.objects.create(shard=0, holder="relay-a", heartbeat_at=now)
    RelayLease.objects.create(shard=1, holder="relay-b", heartbeat_at=now - timedelta(
        seconds=retention.STALE_LEASE_SECS + 5), forwarded_total=7)
    RelayLease.objects.create(shard=2, holder="", heartbeat_at=now - timedelta(days=1))

    result = retention.compact(DAY)

    assert (result.connections_swept, result.edges_swept, result.leases_cleared) == (1, 1, 1)
    assert set(Connection.objects.values_list("connection_id", flat=True)) == {"fresh"}
    assert set(Edge.objects.values_list("edge_id", flat=True)) == {"edge-alive"}
    assert dict(RelayLease.objects.values_list("shard", "holder")) == {0: "relay-a", 1: "", 2: ""}
    assert RelayLease.objects.get(shard=1).forwarded_total == 7  # progress is kept; only the holder goes
    assert "swept 1 connections, 1 edges, 1 leases" in result.summary()


def test_compact__dry_run_sweeps_nothing(tenant):
    edge = Edge.objects.create(edge_id="edge-dead")
    Edge.objects.update(heartbeat_at=timezone.now() - timedelta(days=1))
    Connection.objects.create(connection_id="expired", tenant=tenant, device_id="d", role="client", edge=edge,
                              channel_name="c", expires_at=timezone.now() - timedelta(seconds=1))

    retention.compact(DAY, dry_run=True)

    assert (Edge.objects.count(), Connection.objects.count()) == (1, 1)


# --- idempotency keys ---------------------------------------------------------------------


def age_keys(event_ids: list[str], secs: float) -> None:
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {EVENTKEY} SET created_at = now() - make_interval(secs => %s) WHERE event_id = ANY(%s)",
            [secs, event_ids],
        )


def test_compact__expires_event_keys_older_than_retention(tenant):
    seed(tenant, ["old", "new"])
    age_keys(["old"], 2 * DAY)

    result = retention.compact(DAY)

    assert result.keys_expired == 1
    assert list(EventKey.objects.values_list("event_id", flat=True)) == ["new"]


def test_publish__same_event_id_inside_the_window_is_a_no_op_even_after_its_row_went(tenant):
    seed(tenant, ["e1", "e2", "e3"])
    retention.compact(DAY, max_rows=1)  # the budget takes e1, e2; their keys stay for the window
    assert remaining() == ["e3"]

    with transaction.atomic():
        outbox.publish(tenant, "run.updated", {"again": True}, event_id="e1")
        outbox.publish(tenant, "run.updated", {"again": True}, event_id="e3")

    assert remaining() == ["e3"]
    assert OutboxItem.objects.get(event_id="e3").payload == payload_of(100)


def test_publish__same_event_id_after_its_key_expired_publishes_anew(tenant):
    seed(tenant, ["e1"])
    age(["e1"], 2 * DAY)
    age_keys(["e1"], 2 * DAY)
    assert retention.compact(DAY).keys_expired == 1

    with transaction.atomic():
        outbox.publish(tenant, "run.updated", {"again": True}, event_id="e1")

    row = OutboxItem.objects.get()
    assert (row.event_id, row.payload, row.stream_offset) == ("e1", {"again": True}, None)
    assert EventKey.objects.filter(event_id="e1").count() == 1


def test_compact__dry_run_expires_no_keys(tenant):
    seed(tenant, ["e1"])
    age_keys(["e1"], 2 * DAY)

    retention.compact(DAY, dry_run=True)

    assert EventKey.objects.count() == 1


def _unsummarized_brin_ranges() -> int:
    """Summarise, and count, the page ranges of the created_at BRIN indexes not summarised yet."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(brin_summarize_new_values(i.indexrelid)), 0) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE a.amname = 'brin' AND c.relkind = 'i'"
        )
        return int(cur.fetchone()[0])


def test_compact__summarises_the_created_at_brin_indexes_first(tenant):
    """Compaction finds old rows through BRIN indexes; pages not summarised are read whole, and
    autovacuum (which summarises too) may be off: compaction summarises them itself."""
    # Inserts keep a summarised page range up to date, but a range begun after the last
    # summary (128 pages: ~12 000 event keys) is in no summary until someone summarises it.
    _unsummarized_brin_ranges()
    outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": n}} for n in range(15_000)])
    retention.compact(DAY)
    assert _unsummarized_brin_ranges() == 0
    outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": n}} for n in range(15_000)])
    assert _unsummarized_brin_ranges() > 0  # and without compaction they stay unsummarised


def test_compact__brin_summary_failure_is_not_fatal_and_a_dry_run_summarises_nothing(tenant, monkeypatch, caplog):
    outbox.publish_many(tenant, [{"type": "a.b", "payload": {"n": n}} for n in range(15_000)])
    retention.compact(DAY, dry_run=True)
    assert _unsummarized_brin_ranges() > 0  # a dry run writes nothing, summaries included
    real = connection.cursor

    class Refusing:  # a role that does not own the indexes
        def __init__(self, cur):  # type: ignore[no-untyped-def]
            self.cur = cur

        def __enter__(self):  # type: ignore[no-untyped-def]
            self.inner = self.cur.__enter__()
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            return self.cur.__exit__(*exc)

        def execute(self, sql, params=None):  # type: ignore[no-untyped-def]
            if "brin_summarize_new_values" in sql:
                sql = "SELECT 1/0"
            return self.inner.execute(sql, params)

    monkeypatch.setattr(connection, "cursor", lambda: Refusing(real()))
    with caplog.at_level("WARNING", logger="backplane.store.postgresql"):
        get_store().summarize_indexes()
    assert "could not summarise" in caplog.text
    monkeypatch.undo()
    assert retention.compact(DAY).skipped is False  # and compaction runs on
