"""Retention: keep the outbox bounded while replay stays exact inside the window.

Rules, applied in this order by ``compact()`` (one compactor at a time):

1. **Age** — forwarded rows created (database clock) before ``now - retention`` go.
2. **Row budget** — while more than ``max_rows`` rows remain, the oldest forwarded rows go.
3. **Byte budget** — while the payloads add up to more than ``max_bytes``, the oldest
   forwarded rows go.

A row no relay has forwarded is never deleted, whatever its age or the budgets: such rows
are counted and reported with the age of the oldest. Every deletion raises the touched
streams' ``first_retained_offset`` past the highest deleted offset, so a ``resume`` from
before it answers ``retention_exceeded`` and never replays a partial window. Then the
bookkeeping is swept: idle streams whose items are all gone (after a grace period; they
come back with a new epoch), expired directory rows, dead edges and stale relay leases.

Where the outbox is partitioned (PostgreSQL), whole time partitions are dropped first
(``backplane.partitions``), so at volume most of the work costs no row deletes and no VACUUM.
What differs between backends is the store's (``backplane.store``): the compactor's lock, the
cut-off's SQL, partitions, index summaries, key expiry and space reclaim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import DateTimeField, Exists, OuterRef, QuerySet, Value
from django.utils import timezone

from backplane import directory, metrics, streams
from backplane.conf import conf
from backplane.models import Connection, MovedBucket, OutboxItem, RelayLease, Stream
from backplane.store import EVENTKEY, OUTBOX, STREAM, Store, get_store

logger = logging.getLogger(__name__)

# A relay lease row whose holder has not reported for this long is shown as free.
STALE_LEASE_SECS = 60

Progress = Callable[[int, int], None]


@dataclass
class CompactionResult:
    deleted: int = 0
    deleted_bytes: int = 0
    by_rule: dict[str, int] = field(default_factory=lambda: {"age": 0, "rows": 0, "bytes": 0, "partitions": 0})
    partitions_dropped: int = 0
    unforwarded_expired: int = 0
    oldest_unforwarded_age_secs: float = 0.0
    streams_pruned: int = 0
    connections_swept: int = 0
    edges_swept: int = 0
    leases_cleared: int = 0
    keys_expired: int = 0
    batches: int = 0
    capped: bool = False
    skipped: bool = False
    dry_run: bool = False

    def summary(self) -> str:
        if self.skipped:
            return "another compactor holds the lock; nothing done"
        verb = "would delete" if self.dry_run else "deleted"
        rules = ", ".join(f"{k} {v}" for k, v in self.by_rule.items() if v)
        text = f"{verb} {self.deleted} rows ({self.deleted_bytes} payload bytes{'; ' + rules if rules else ''})"
        if self.partitions_dropped:
            text += f"; dropped {self.partitions_dropped} partitions"
        if self.unforwarded_expired:
            text += (
                f"; kept {self.unforwarded_expired} unforwarded rows past retention "
                f"(oldest {self.oldest_unforwarded_age_secs:.0f}s)"
            )
        if not self.dry_run:
            text += (
                f"; pruned {self.streams_pruned} streams, swept {self.connections_swept} connections, "
                f"{self.edges_swept} edges, {self.leases_cleared} leases"
            )
        if self.capped:
            text += "; stopped at the per-run cap (run again)"
        return text


def _cutoff_sql() -> str:
    """SQL for "now minus %s seconds" on the store's database clock."""
    return get_store().cutoff_sql


def compact(
    retention_secs: float | None = None,
    *,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    batch_size: int | None = None,
    max_batches: int = 2000,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> CompactionResult:
    """Apply the retention rules once; bounded by ``max_batches`` batches of ``batch_size``."""
    retention = float(retention_secs if retention_secs is not None else conf.RETENTION_SECS)
    max_rows = max_rows if max_rows is not None else conf.COMPACT_MAX_ROWS
    max_bytes = max_bytes if max_bytes is not None else conf.COMPACT_MAX_BYTES
    batch = batch_size or conf.COMPACT_BATCH_SIZE
    result = CompactionResult(dry_run=dry_run)
    store = get_store()
    with store.compactor_lock() as got:
        if not got:
            result.skipped = True
            return result
        _report_unforwarded(result, retention)
        plan, planned_bytes = _plan(retention, max_rows, max_bytes)
        total = sum(plan.values())
        if dry_run:
            result.by_rule.update(plan)
            result.deleted = total
            result.deleted_bytes = planned_bytes
            return result
        store.summarize_indexes()
        dropped_rows, dropped_bytes, dropped = store.drop_expired_partitions(retention)
        result.partitions_dropped = dropped
        result.by_rule["partitions"] = dropped_rows
        result.deleted += dropped_rows
        result.deleted_bytes += dropped_bytes
        store.ensure_partitions()
        state = {"done": 0}

        def tick(n: int) -> None:
            state["done"] += n
            if progress:
                progress(state["done"], max(total, state["done"]))

        for rule, where, limit in _rules(retention, max_rows, max_bytes):
            while result.batches < max_batches:
                n, nbytes = _delete_batch(where, limit(), batch)
                if not n:
                    break
                result.batches += 1
                result.by_rule[rule] += n
                result.deleted += n
                result.deleted_bytes += nbytes
                tick(n)
            else:
                result.capped = True
                break
        result.keys_expired = _expire_keys(store, retention, batch, max_batches)
        _sweep(result)
        _reclaim(store, result)
    metrics.record_compaction(result)
    logger.info("compaction: %s", result.summary(), extra={"action": "compact"})
    return result


def _report_unforwarded(result: CompactionResult, retention: float) -> None:
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*), min(created_at) FROM {OUTBOX} "
            f"WHERE forwarded_at IS NULL AND created_at < {_cutoff_sql()}",
            [retention],
        )
        count, oldest = cur.fetchone()
    result.unforwarded_expired = int(count or 0)
    if oldest is not None:
        if isinstance(oldest, str):
            from datetime import UTC, datetime

            oldest = datetime.fromisoformat(oldest).replace(tzinfo=UTC)
        result.oldest_unforwarded_age_secs = (timezone.now() - oldest).total_seconds()
    if result.unforwarded_expired:
        logger.warning(
            "%d rows past retention are not forwarded yet (oldest %.0fs); kept",
            result.unforwarded_expired,
            result.oldest_unforwarded_age_secs,
            extra={"action": "compact_unforwarded"},
        )


def _totals() -> tuple[int, int]:
    with connection.cursor() as cur:
        cur.execute(f"SELECT count(*), coalesce(sum(payload_bytes), 0) FROM {OUTBOX}")
        rows, nbytes = cur.fetchone()
    return int(rows), int(nbytes)


def _plan(retention: float, max_rows: int | None, max_bytes: int | None) -> tuple[dict[str, int], int]:
    """Count what each rule would delete now, and the payload bytes (rules apply in order)."""
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*), coalesce(sum(payload_bytes), 0) FROM {OUTBOX} "
            f"WHERE forwarded_at IS NOT NULL AND created_at < {_cutoff_sql()}",
            [retention],
        )
        age_rows, age_bytes = (int(x) for x in cur.fetchone())
    rows, nbytes = _totals()
    rows -= age_rows
    nbytes -= age_bytes
    plan = {"age": age_rows, "rows": 0, "bytes": 0}
    planned = age_bytes
    over_rows = max_rows is not None and rows > max_rows
    over_bytes = max_bytes is not None and nbytes > max_bytes
    if over_rows or over_bytes:
        # What the budgets take: the oldest forwarded rows that the age rule leaves, counted
        # and summed in the database (not one size per row into Python).
        kept = f"FROM {OUTBOX} WHERE forwarded_at IS NOT NULL AND NOT (created_at < {_cutoff_sql()})"
        skipped_bytes = 0
        with connection.cursor() as cur:
            if max_rows is not None and rows > max_rows:
                cur.execute(
                    f"SELECT count(*), coalesce(sum(payload_bytes), 0) FROM "
                    f"(SELECT payload_bytes {kept} ORDER BY id LIMIT %s) t",
                    [retention, rows - max_rows],
                )
                taken, skipped_bytes = (int(x) for x in cur.fetchone())
                plan["rows"] = taken
                rows, nbytes, planned = rows - taken, nbytes - skipped_bytes, planned + skipped_bytes
            if max_bytes is not None and nbytes > max_bytes:
                # The next rows in id order, each taken while the bytes taken before it fall
                # short of the excess.
                cur.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM (SELECT payload_bytes AS size, "
                    f"row_number() OVER w AS n, sum(payload_bytes) OVER w AS running {kept} "
                    f"WINDOW w AS (ORDER BY id ROWS UNBOUNDED PRECEDING)) t "
                    f"WHERE n > %s AND running - size - %s < %s",
                    [retention, plan["rows"], skipped_bytes, nbytes - max_bytes],
                )
                taken, taken_bytes = (int(x) for x in cur.fetchone())
                plan["bytes"] = taken
                planned += taken_bytes
    return plan, planned


def _rules(
    retention: float, max_rows: int | None, max_bytes: int | None
) -> list[tuple[str, tuple[str, list[Any]], Callable[[], int | None]]]:
    """Each rule: its WHERE clause, and a function giving how many rows it may still take."""
    age = (f"forwarded_at IS NOT NULL AND created_at < {_cutoff_sql()}", [retention])
    forwarded: tuple[str, list[Any]] = ("forwarded_at IS NOT NULL", [])

    def row_excess() -> int | None:
        return max(0, _totals()[0] - max_rows) if max_rows is not None else 0

    def byte_excess() -> int | None:
        if max_bytes is None:
            return 0
        excess = _totals()[1] - max_bytes
        return -excess if excess > 0 else 0  # negative: a byte budget, not a row count

    return [("age", age, lambda: None), ("rows", forwarded, row_excess), ("bytes", forwarded, byte_excess)]


def _delete_batch(where: tuple[str, list[Any]], limit: int | None, batch: int) -> tuple[int, int]:
    """Delete one batch of the oldest matching rows; return (rows, payload bytes)."""
    if limit == 0:
        return 0, 0
    clause, params = where
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            f"SELECT id, stream, stream_offset, payload_bytes FROM {OUTBOX} WHERE {clause} ORDER BY id LIMIT %s",
            [*params, batch],
        )
        rows = cur.fetchall()
        if limit is not None and limit > 0:
            rows = rows[:limit]
        elif limit is not None and limit < 0:  # byte budget: take rows until the excess is covered
            need, taken = -limit, []
            for row in rows:
                if need <= 0:
                    break
                taken.append(row)
                need -= row[3]
            rows = taken
        if not rows:
            return 0, 0
        ids = [r[0] for r in rows]
        cur.execute(f"DELETE FROM {OUTBOX} WHERE id IN ({','.join(['%s'] * len(ids))})", ids)
        raise_first_retained(cur, rows)
        return len(rows), sum(r[3] for r in rows)


def raise_first_retained(cur: object, rows: list[tuple[object, ...]]) -> None:
    """Record, per stream, that offsets up to the highest deleted one are gone."""
    top: dict[str, int] = {}
    for _, stream, offset, *_ in rows:
        if offset is not None:
            top[str(stream)] = max(top.get(str(stream), 0), int(offset))  # type: ignore[call-overload]
    for stream, offset in sorted(top.items()):
        cur.execute(  # type: ignore[attr-defined]
            f"UPDATE {STREAM} SET first_retained_offset = %s WHERE key = %s AND first_retained_offset <= %s",
            [offset + 1, stream, offset],
        )


def _expire_keys(store: Store, retention: float, batch: int, max_batches: int) -> int:
    """Forget idempotency keys older than the window (a retry after it publishes anew)."""
    gone = 0
    for _ in range(max_batches):
        n = store.expire_keys(retention, batch)
        gone += n
        if n < batch:
            break
    return gone


def _reclaim(store: Store, result: CompactionResult) -> None:
    """Make the space of deleted rows reusable, so sizes stay flat even without autovacuum.

    Only what row deletes touched: the narrow key table, and the outbox when the budgets or a
    DEFAULT partition took the row-delete path. Whole-partition drops need none.
    """
    tables = [EVENTKEY] if result.keys_expired else []
    if result.deleted > result.by_rule.get("partitions", 0):
        tables.append(OUTBOX)
    if tables:
        store.reclaim(tables)


def _sweep(result: CompactionResult) -> None:
    now = timezone.now()
    result.connections_swept, result.edges_swept = directory.sweep(now)
    stale = now - timedelta(seconds=STALE_LEASE_SECS)
    result.leases_cleared = RelayLease.objects.filter(heartbeat_at__lt=stale).exclude(holder="").update(holder="")
    result.streams_pruned = prune_idle_streams(now - timedelta(seconds=conf.STREAM_PRUNE_GRACE_SECS))


def idle_streams(before: datetime) -> QuerySet[Stream, str]:
    """The keys of streams with no retained items and untouched since ``before`` (edges' own aside).

    By bp_stream_moved, not a scan of every stream: ``updated_at < before`` implies
    ``moved_bucket <= before's bucket`` (the same monotonic expression; decision 0036)."""
    return (
        Stream.objects.exclude(audience="edge")
        .filter(moved_bucket__lte=MovedBucket(Value(before, output_field=DateTimeField())), updated_at__lt=before)
        .filter(~Exists(OutboxItem.objects.filter(stream=OuterRef("key"))))
        .values_list("key", flat=True)
    )


def prune_idle_streams(before: datetime, limit: int = 10_000) -> int:
    """Delete streams with no retained items, untouched since ``before``, with no live socket.

    A pruned stream that gets a new event is created again with a new epoch, so a peer that
    resumes with the old epoch is told ``epoch_changed`` instead of replaying a wrong window.
    """
    keys = list(idle_streams(before)[:limit])
    if not keys:
        return 0
    live: set[str] = set()
    for tenant_id, role, device_id in Connection.objects.values_list("tenant_id", "role", "device_id"):
        live.update(streams.connection_streams(tenant_id, role, device_id).values())
    doomed = [k for k in keys if k not in live]
    gone = 0
    with connection.cursor() as cur:
        for start in range(0, len(doomed), 500):
            chunk = doomed[start : start + 500]
            # Re-check in the DELETE itself: a relay may have assigned a new row since the SELECT.
            cur.execute(
                f"DELETE FROM {STREAM} WHERE key IN ({','.join(['%s'] * len(chunk))}) AND updated_at < %s "
                f"AND NOT EXISTS (SELECT 1 FROM {OUTBOX} o WHERE o.stream = {STREAM}.key)",
                [*chunk, before],
            )
            gone += cur.rowcount
    return gone
