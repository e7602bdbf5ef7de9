"""Time partitions of the outbox on PostgreSQL (native RANGE partitioning on created_at).

Used by the PostgreSQL store only (``backplane.store.postgresql``); migration 0002 made the
outbox partitioned (with its own frozen copy of the DDL).

Partitions of ``PARTITION_INTERVAL_SECS`` are created ``PARTITIONS_AHEAD`` intervals ahead
(at migrate, by relays every few minutes, and by every compaction). A DEFAULT partition
catches rows if creation ever lapses; they are then compacted by plain deletes. Compaction
drops a whole partition once its upper bound is past retention and every row in it has
been forwarded — no row deletes, no VACUUM. DDL runs with a short ``lock_timeout`` so a long
producer transaction delays a drop to the next run instead of queueing every publisher.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import DatabaseError, connection, transaction

from backplane.conf import conf
from backplane.store.base import OUTBOX

logger = logging.getLogger(__name__)

TABLE = OUTBOX
DEFAULT_PARTITION = f"{TABLE}_default"
# DDL on the parent waits at most this long for its lock, then gives up until the next run.
DDL_LOCK_TIMEOUT = "2s"
# A drop waits at most this long for the parent: publishers queue behind the request meanwhile.
DROP_LOCK_TIMEOUT = "100ms"
_BOUND_RE = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")


def is_partitioned(cur: Any = None) -> bool:
    """True when the outbox is partitioned (it is after migrate; a check, not an assumption)."""
    own = cur is None
    cur = cur or connection.cursor()
    try:
        cur.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s)", [TABLE])
        return cur.fetchone() is not None
    finally:
        if own:
            cur.close()


def _name(start: datetime) -> str:
    return f"{TABLE}_p{start:%Y%m%d_%H%M%S}"


def _db_now(cur: Any) -> datetime:
    cur.execute("SELECT now()")
    value: datetime = cur.fetchone()[0]
    return value.astimezone(UTC)


def partitions(cur: Any) -> list[tuple[str, datetime | None, datetime | None]]:
    """Return (name, lower, upper) of every partition; bounds None for the default one."""
    cur.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s) ORDER BY c.relname",
        [TABLE],
    )
    result: list[tuple[str, datetime | None, datetime | None]] = []
    for name, bound in cur.fetchall():
        match = _BOUND_RE.search(bound or "")
        if match is None:
            result.append((name, None, None))
        else:
            lower, upper = (datetime.fromisoformat(x).astimezone(UTC) for x in match.groups())
            result.append((name, lower, upper))
    return result


def ensure_ahead(cur: Any = None) -> int:
    """Create missing partitions from the current interval to PARTITIONS_AHEAD ahead."""
    if not is_partitioned(cur):
        return 0
    interval = int(conf.PARTITION_INTERVAL_SECS)
    created = 0
    with connection.cursor() as own:
        c = cur or own
        now = _db_now(c)
        existing = {name for name, _, _ in partitions(c)}
        first = int(now.timestamp()) // interval * interval
        for k in range(int(conf.PARTITIONS_AHEAD) + 1):
            start = datetime.fromtimestamp(first + k * interval, UTC)
            name = _name(start)
            if name in existing:
                continue
            end = start + timedelta(seconds=interval)
            try:
                with transaction.atomic():
                    c.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                    c.execute(
                        f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)',
                        [start, end],
                    )
                created += 1
            except DatabaseError as exc:  # rows already in DEFAULT for that range, or a lock wait
                logger.warning(
                    "could not create partition %s: %s",
                    name,
                    type(exc).__name__,
                    extra={"action": "partition_create_failed"},
                )
    if created:
        logger.info("created %d outbox partitions", created, extra={"action": "partition_created"})
    return created


def drop_expired(retention_secs: float) -> tuple[int, int, int]:
    """Drop partitions wholly past retention with every row forwarded; return (rows, bytes, partitions)."""
    if not is_partitioned():
        return 0, 0, 0
    rows = nbytes = dropped = 0
    with connection.cursor() as cur:
        cutoff = _db_now(cur) - timedelta(seconds=retention_secs)
        for name, _lower, upper in partitions(cur):
            if upper is None or upper > cutoff:
                continue
            try:
                with transaction.atomic():
                    cur.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
                    # Parent first, then the partition: the order every statement on the outbox
                    # takes them in (no deadlock), and a short wait bounds how long publishers
                    # queue behind this lock request.
                    cur.execute(f"LOCK TABLE ONLY {TABLE} IN ACCESS EXCLUSIVE MODE")
                    cur.execute(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE')
                    cur.execute(
                        f"SELECT count(*), count(*) FILTER (WHERE forwarded_at IS NULL), "
                        f'coalesce(sum(payload_bytes), 0) FROM "{name}"'
                    )
                    total, unforwarded, size = cur.fetchone()
                    if unforwarded:
                        logger.warning(
                            "partition %s keeps %d unforwarded rows; not dropped",
                            name,
                            unforwarded,
                            extra={"action": "partition_kept"},
                        )
                        continue
                    cur.execute(
                        f"UPDATE backplane_stream s SET first_retained_offset = m.top + 1 FROM "
                        f'(SELECT stream, max(stream_offset) AS top FROM "{name}" GROUP BY stream) m '
                        f"WHERE s.key = m.stream AND s.first_retained_offset <= m.top"
                    )
                    cur.execute(f'DROP TABLE "{name}"')
                rows += int(total)
                nbytes += int(size)
                dropped += 1
            except DatabaseError as exc:
                logger.warning(
                    "could not drop partition %s: %s",
                    name,
                    type(exc).__name__,
                    extra={"action": "partition_drop_failed"},
                )
    return rows, nbytes, dropped
