"""Retention: delete forwarded outbox rows past the window, keep replay exact inside it.

Never deletes a row no relay has forwarded. After deleting, each touched stream records its
lowest retained offset, so a ``resume`` from before it answers ``retention_exceeded``.
(Issue 3 adds budgets, partition drops and the compaction benchmark.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import connection, transaction

from backplane.conf import conf
from backplane.outbox import OUTBOX, STREAM

logger = logging.getLogger(__name__)


@dataclass
class CompactionResult:
    deleted: int = 0
    unforwarded_expired: int = 0
    batches: int = 0


def compact(
    retention_secs: float | None = None,
    *,
    batch_size: int | None = None,
    max_batches: int = 1000,
    dry_run: bool = False,
) -> CompactionResult:
    """Delete forwarded rows older than ``retention_secs`` by the database clock, in batches."""
    retention = float(retention_secs if retention_secs is not None else conf.RETENTION_SECS)
    batch = batch_size or conf.COMPACT_BATCH_SIZE
    pg = conf.is_postgresql
    cutoff = "now() - make_interval(secs => %s)" if pg else "datetime('now', '-' || %s || ' seconds')"
    result = CompactionResult()
    with connection.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {OUTBOX} WHERE forwarded_at IS NULL AND created_at < {cutoff}", [retention])
        result.unforwarded_expired = cur.fetchone()[0]
        if dry_run:
            cur.execute(
                f"SELECT count(*) FROM {OUTBOX} WHERE forwarded_at IS NOT NULL AND created_at < {cutoff}", [retention]
            )
            result.deleted = cur.fetchone()[0]
            return result
    while result.batches < max_batches:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(
                f"SELECT id, stream, stream_offset FROM {OUTBOX} WHERE forwarded_at IS NOT NULL "
                f"AND created_at < {cutoff} ORDER BY id LIMIT %s",
                [retention, batch],
            )
            rows = cur.fetchall()
            if not rows:
                break
            ids = [r[0] for r in rows]
            top: dict[str, int] = {}
            for _, stream, offset in rows:
                top[stream] = max(top.get(stream, 0), offset)
            cur.execute(f"DELETE FROM {OUTBOX} WHERE id IN ({','.join(['%s'] * len(ids))})", ids)
            for stream, offset in top.items():
                cur.execute(
                    f"UPDATE {STREAM} SET first_retained_offset = %s WHERE key = %s AND first_retained_offset <= %s",
                    [offset + 1, stream, offset],
                )
            result.deleted += len(ids)
            result.batches += 1
    if result.unforwarded_expired:
        logger.warning(
            "%d rows past retention are not forwarded yet; kept",
            result.unforwarded_expired,
            extra={"action": "compact_unforwarded"},
        )
    return result
