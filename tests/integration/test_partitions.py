"""Time partitions of the outbox on PostgreSQL: layout after migrate, partitions ahead,
whole-partition drops by compaction, and the DEFAULT partition's row-delete path.

Old partitions are made with plain SQL for a range days in the past; rows are moved into them
by updating ``created_at`` (PostgreSQL moves a row between partitions on such an update).
DDL is not undone by the per-test truncation, so every partition a test makes is dropped
after it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.db import connection, connections, transaction
from django.test import override_settings

from backplane import outbox, partitions, retention, streams
from backplane.conf import conf
from backplane.models import OutboxItem, Stream
from backplane.store import get_store

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TABLE = partitions.TABLE
HOUR = 3600.0
DAY = 24 * HOUR


def db_now() -> datetime:
    with connection.cursor() as cur:
        cur.execute("SELECT now()")
        return cur.fetchone()[0].astimezone(UTC)


def partition_of(event_id: str) -> str:
    with connection.cursor() as cur:
        cur.execute(f"SELECT tableoid::regclass::text FROM {TABLE} WHERE event_id = %s", [event_id])
        return str(cur.fetchone()[0])


def exists(name: str) -> bool:
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        return bool(cur.fetchone()[0])


def bounds() -> dict[str, tuple[datetime | None, datetime | None]]:
    with connection.cursor() as cur:
        return {name: (lo, hi) for name, lo, hi in partitions.partitions(cur)}


def seed(tenant, names: list[str], *, forwarded: bool = True, assign: bool = True, **audience) -> None:
    outbox.publish_many(tenant, [{"type": "run.updated", "payload": {"n": n}, "event_id": n, **audience}
                                 for n in names])
    if assign:
        get_store().assign(list(range(conf.SHARDS)), 10_000)
    if forwarded:
        get_store().mark_forwarded(list(OutboxItem.objects.filter(event_id__in=names).values_list("id", flat=True)))


def move(names: list[str], at: datetime) -> None:
    with connection.cursor() as cur:
        cur.execute(f"UPDATE {TABLE} SET created_at = %s WHERE event_id = ANY(%s)", [at, names])


def remaining() -> list[str]:
    return list(OutboxItem.objects.order_by("id").values_list("event_id", flat=True))


class OldPartitions:
    """Make partitions for past ranges; drop whatever is left of them afterwards."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def make(self, lower: datetime, upper: datetime) -> str:
        name = f"{TABLE}_ptest_{uuid.uuid4().hex[:8]}"
        with connection.cursor() as cur:
            cur.execute(f'CREATE TABLE "{name}" PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)', [lower, upper])
        self.made.append(name)
        return name

    def hour_ago(self, hours: int) -> tuple[str, datetime, datetime]:
        """A one-hour partition starting ``hours`` whole hours before the current hour."""
        now = db_now()
        lower = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours)
        upper = lower + timedelta(hours=1)
        return self.make(lower, upper), lower, upper

    def drop(self) -> None:
        with connection.cursor() as cur:
            for name in self.made:
                cur.execute(f'DROP TABLE IF EXISTS "{name}"')


@pytest.fixture
def old(services) -> Iterator[OldPartitions]:
    made = OldPartitions()
    yield made
    made.drop()


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


# --- layout -------------------------------------------------------------------------------


def test_migrate__outbox_is_range_partitioned_on_created_at_with_a_default(services):
    with connection.cursor() as cur:
        cur.execute(
            "SELECT p.partstrat, a.attname, d.relname FROM pg_partitioned_table p "
            "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0] "
            "LEFT JOIN pg_class d ON d.oid = p.partdefid WHERE p.partrelid = to_regclass(%s)",
            [TABLE],
        )
        assert cur.fetchall() == [("r", "created_at", partitions.DEFAULT_PARTITION)]
        cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s ORDER BY indexname", [TABLE])
        assert [r[0] for r in cur.fetchall()] == [
            "backplane_outboxitem_pkey_p", "bp_outbox_created_brin", "bp_outbox_stream_offset",
            "bp_outbox_unassigned_id", "bp_outbox_unforwarded",
        ]
        # created_at (compaction's range deletes) is a BRIN index, there and on the event keys:
        # no B-tree insertion per published event.
        cur.execute(
            "SELECT c.relname, a.amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
            "WHERE c.relname IN ('bp_outbox_created_brin', 'bp_eventkey_created_brin') ORDER BY 1"
        )
        assert cur.fetchall() == [("bp_eventkey_created_brin", "brin"), ("bp_outbox_created_brin", "brin")]
        cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'backplane_eventkey'")
        assert cur.fetchone()[0] == 2  # the primary key and the BRIN index
    assert partitions.is_partitioned()


def test_stream_offset_migration__builds_partition_by_partition_and_runs_again_after_an_interruption(services):
    import importlib

    step = importlib.import_module("backplane.migrations.0007_outbox_stream_offset_partial")
    with connection.cursor() as cur:  # what an interrupted run leaves: a half-made parent index
        cur.execute(f"CREATE INDEX {step.BUILDING} ON ONLY {TABLE} (stream)")
    try:
        with connection.schema_editor(atomic=False) as editor:
            step.rebuild(editor, " WHERE stream_offset IS NOT NULL", "_stream_offset_p")
        with connection.cursor() as cur:
            cur.execute(
                "SELECT x.indisvalid, pg_get_indexdef(x.indexrelid) FROM pg_index x "
                "WHERE x.indexrelid = %s::regclass",
                [step.NAME],
            )
            valid, definition = cur.fetchone()
            assert valid and definition.endswith("(stream, stream_offset) WHERE (stream_offset IS NOT NULL)")
            cur.execute("SELECT to_regclass(%s)", [step.BUILDING])
            assert cur.fetchone()[0] is None
            # Every partition has its own index, built apart and attached.
            cur.execute(
                "SELECT count(*) FROM pg_inherits i WHERE i.inhparent = %s::regclass",
                [TABLE],
            )
            partitions_count = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = %s::regclass", [step.NAME])
            assert cur.fetchone()[0] == partitions_count > 0
    finally:
        with connection.cursor() as cur:
            cur.execute(f"DROP INDEX IF EXISTS {step.BUILDING}")


def test_stream_offset_index__holds_assigned_rows_only_and_serves_range_reads(services, tenant):
    with transaction.atomic():
        outbox.publish(tenant, "run.step", {"n": 1}, device="d-1")
    with connection.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'bp_outbox_stream_offset'")
        # Partial: a row published but not assigned yet is not in it (no insertion per publish).
        assert cur.fetchone()[0].endswith("WHERE (stream_offset IS NOT NULL)")
    get_store().assign(list(range(conf.SHARDS)), 100)
    key = streams.device_stream(tenant.id, "d-1")
    # Reads by offset imply the condition, so they use it.
    assert [i.offset for i in get_store().read_range(key, 0, 1)] == [1]
    with connection.cursor() as cur:
        cur.execute(
            f"EXPLAIN SELECT stream_offset FROM {TABLE} WHERE stream = %s AND stream_offset > %s "
            f"AND stream_offset <= %s ORDER BY stream_offset",
            [key, 0, 1],
        )
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "Index" in plan and "stream_offset" in plan and "Seq Scan" not in plan


def test_ensure_ahead__partitions_cover_now_to_partitions_ahead(services):
    partitions.ensure_ahead()

    interval = conf.PARTITION_INTERVAL_SECS
    start = int(db_now().timestamp()) // interval * interval
    have = {(lo, hi) for lo, hi in bounds().values() if lo is not None}
    for k in range(conf.PARTITIONS_AHEAD + 1):
        lower = datetime.fromtimestamp(start + k * interval, UTC)
        assert (lower, lower + timedelta(seconds=interval)) in have, f"no partition {k} intervals ahead"


def test_ensure_ahead__is_idempotent(services):
    partitions.ensure_ahead()
    before = bounds()

    assert partitions.ensure_ahead() == 0
    assert partitions.ensure_ahead() == 0
    assert bounds() == before


def test_ensure_ahead__creates_what_more_ahead_needs(services):
    partitions.ensure_ahead()
    before = set(bounds())
    try:
        with override_settings(BACKPLANE={"PARTITIONS_AHEAD": conf.PARTITIONS_AHEAD + 2}):
            assert partitions.ensure_ahead() == 2
            assert partitions.ensure_ahead() == 0
    finally:
        with connection.cursor() as cur:
            for name in set(bounds()) - before:
                cur.execute(f'DROP TABLE "{name}"')


def test_publish__new_rows_land_in_the_current_partition_not_the_default(tenant):
    partitions.ensure_ahead()
    seed(tenant, ["e1"], forwarded=False, assign=False)

    name = partition_of("e1")
    lower, upper = bounds()[name]
    assert name != partitions.DEFAULT_PARTITION
    assert lower <= OutboxItem.objects.get().created_at < upper


# --- whole-partition drops ----------------------------------------------------------------


def test_compact__drops_an_expired_fully_forwarded_partition_and_raises_first_retained(tenant, old):
    name, lower, _ = old.hour_ago(72)
    seed(tenant, [f"t{i}" for i in range(5)])
    seed(tenant, [f"d{i}" for i in range(3)], device="dev-1")
    moved = [f"t{i}" for i in range(5)] + [f"d{i}" for i in range(3)]
    move(moved, lower + timedelta(minutes=5))
    seed(tenant, ["t-fresh"])
    assert {partition_of(n) for n in moved} == {name}

    result = retention.compact(DAY)

    assert (result.partitions_dropped, result.by_rule["partitions"], result.deleted) == (1, 8, 8)
    assert result.by_rule["age"] == 0  # nothing was left for the row path
    assert not exists(name)
    assert remaining() == ["t-fresh"]
    first = dict(Stream.objects.values_list("key", "first_retained_offset"))
    assert first == {streams.tenant_stream(tenant.id): 6, streams.device_stream(tenant.id, "dev-1"): 4}
    assert "dropped 1 partitions" in result.summary()


@pytest.mark.parametrize("pending", ["unforwarded", "unassigned"])
def test_compact__keeps_a_partition_with_a_pending_row(tenant, old, pending):
    name, lower, _ = old.hour_ago(72)
    seed(tenant, ["f0", "f1", "f2"])
    seed(tenant, ["p"], forwarded=False, assign=pending == "unforwarded")
    move(["f0", "f1", "f2", "p"], lower + timedelta(minutes=5))

    result = retention.compact(DAY)

    assert exists(name)
    assert result.partitions_dropped == 0
    assert (result.by_rule["age"], result.unforwarded_expired) == (3, 1)  # the row path took the rest
    assert remaining() == ["p"]

    get_store().assign(list(range(conf.SHARDS)), 10)
    get_store().mark_forwarded(list(OutboxItem.objects.values_list("id", flat=True)))
    again = retention.compact(DAY)
    assert (again.partitions_dropped, again.by_rule["partitions"]) == (1, 1)
    assert not exists(name)
    assert Stream.objects.get(key=streams.tenant_stream(tenant.id)).first_retained_offset == 5


def test_compact__keeps_a_partition_whose_upper_bound_is_inside_retention(tenant, old):
    name, lower, upper = old.hour_ago(72)
    seed(tenant, ["f0", "f1"])
    move(["f0", "f1"], lower + timedelta(minutes=50))
    # Rows past the window, the partition's upper bound 5 minutes inside it.
    window = (db_now() - upper).total_seconds() + 300

    result = retention.compact(window)

    assert exists(name)
    assert (result.partitions_dropped, result.by_rule["age"]) == (0, 2)
    assert remaining() == []


def test_compact__drops_only_the_expired_partitions(tenant, old):
    older, lower1, _ = old.hour_ago(96)
    newer, lower2, _ = old.hour_ago(2 * 24 - 1)
    seed(tenant, ["a0", "a1"])
    seed(tenant, ["b0"])
    move(["a0", "a1"], lower1 + timedelta(minutes=1))
    move(["b0"], lower2 + timedelta(minutes=1))

    result = retention.compact(3 * DAY)

    assert (exists(older), exists(newer)) == (False, True)
    assert (result.partitions_dropped, result.by_rule["partitions"]) == (1, 2)
    assert remaining() == ["b0"]
    assert Stream.objects.get().first_retained_offset == 3


def test_compact__dry_run_drops_no_partition(tenant, old):
    name, lower, _ = old.hour_ago(72)
    seed(tenant, ["f0", "f1"])
    move(["f0", "f1"], lower)

    result = retention.compact(DAY, dry_run=True)

    assert exists(name)
    assert result.deleted == 2
    assert remaining() == ["f0", "f1"]


def test_compact__empty_expired_partition_is_dropped(services, old):
    name, _, _ = old.hour_ago(72)

    result = retention.compact(DAY)

    assert not exists(name)
    assert (result.partitions_dropped, result.deleted) == (1, 0)


def test_compact__rows_in_the_default_partition_go_by_row_deletes(tenant):
    seed(tenant, ["d0", "d1", "d2", "keep"])
    move(["d0", "d1", "d2"], db_now() - timedelta(days=10))  # no partition covers that range
    assert {partition_of(n) for n in ("d0", "d1", "d2")} == {partitions.DEFAULT_PARTITION}

    result = retention.compact(DAY, batch_size=2)

    assert (result.by_rule["age"], result.partitions_dropped, result.batches) == (3, 0, 2)
    assert exists(partitions.DEFAULT_PARTITION)
    assert remaining() == ["keep"]
    assert Stream.objects.get().first_retained_offset == 4


def test_compact__partition_drop_waiting_for_its_lock_gives_up_and_rows_go_by_row_deletes(tenant, old):
    name, lower, _ = old.hour_ago(72)
    seed(tenant, ["f0", "f1"])
    move(["f0", "f1"], lower)
    db = connection.settings_dict
    reader = psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"] or "postgres",
                             dbname=db["NAME"])
    try:
        reader.execute(f'SELECT count(*) FROM "{name}"')  # an open transaction holds a share lock on it
        started = time.monotonic()
        result = retention.compact(DAY)
        took = time.monotonic() - started
    finally:
        reader.close()

    assert took < 10
    assert exists(name)
    assert (result.partitions_dropped, result.by_rule["age"]) == (0, 2)
    assert remaining() == []
    assert retention.compact(DAY).partitions_dropped == 1  # the next run drops the empty partition


def test_compact__partition_drop_does_not_stall_publishers_behind_a_long_transaction(tenant, old):
    name, lower, _ = old.hour_ago(72)
    seed(tenant, ["f0"])
    move(["f0"], lower)
    db = connection.settings_dict
    long_tx = psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432,
                              user=db["USER"] or "postgres", dbname=db["NAME"])
    done = threading.Event()

    def compactor() -> None:
        try:
            retention.compact(DAY)
        finally:
            connections.close_all()
            done.set()

    try:
        # A producer's transaction that stays open (a slow request, a batch job): it holds
        # ROW EXCLUSIVE on the outbox until it ends.
        long_tx.execute(f"SELECT count(*) FROM {TABLE} WHERE false")
        thread = threading.Thread(target=compactor)
        thread.start()
        time.sleep(0.3)  # the compactor is now waiting for its DDL lock
        started = time.monotonic()
        with transaction.atomic():
            outbox.publish(tenant, "run.updated", {}, event_id="during")
        stalled = time.monotonic() - started
        thread.join(timeout=30)
    finally:
        long_tx.close()

    assert done.is_set()
    assert stalled < 0.5, f"a publisher waited {stalled:.2f}s behind the partition drop"


def test_compact__partition_drop_reports_the_payload_bytes_it_removed(tenant, old):
    _, lower, _ = old.hour_ago(72)
    seed(tenant, ["f0", "f1", "f2"])
    move(["f0", "f1", "f2"], lower)
    size = sum(OutboxItem.objects.values_list("payload_bytes", flat=True))

    result = retention.compact(DAY)

    assert result.partitions_dropped == 1
    assert result.deleted_bytes == size > 0


def waiting_for_parent_lock(probe: psycopg.Connection) -> bool:
    row = probe.execute(
        "SELECT count(*) FROM pg_locks WHERE relation = to_regclass(%s) AND mode = 'AccessExclusiveLock' "
        "AND NOT granted",
        [TABLE],
    ).fetchone()
    return bool(row and row[0])


def test_compact__partition_drop_does_not_deadlock_a_reader_of_the_outbox(tenant, old):
    name, lower, _ = old.hour_ago(72)
    seed(tenant, ["f0"])
    move(["f0"], lower)
    db = connection.settings_dict
    params = {"host": db["HOST"] or "127.0.0.1", "port": db["PORT"] or 5432, "user": db["USER"] or "postgres",
              "dbname": db["NAME"]}
    reader = psycopg.connect(**params)
    probe = psycopg.connect(**params, autocommit=True)
    thread = threading.Thread(target=lambda: (retention.compact(DAY), connections.close_all()))
    outcome: dict[str, object] = {}
    try:
        # A transaction that already holds the outbox (as the relay's claim or a producer's
        # insert does) and then reads it across partitions (as the relay's claim goes on to).
        reader.execute(f"LOCK TABLE ONLY {TABLE} IN ACCESS SHARE MODE")
        thread.start()
        deadline = time.monotonic() + 5
        while not waiting_for_parent_lock(probe) and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        try:
            reader.execute(f"SELECT count(*) FROM {TABLE}")
            outcome["error"] = None
        except psycopg.Error as exc:
            outcome["error"] = type(exc).__name__
        outcome["secs"] = round(time.monotonic() - started, 2)
        reader.rollback()
        thread.join(timeout=30)
    finally:
        reader.close()
        probe.close()

    assert outcome["error"] is None and outcome["secs"] < 0.5, outcome
