"""What ``backplane_status`` and the admin show: backlog, lag, leases, edges, streams."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.models import Count
from django.utils import timezone

from backplane.models import Connection, Edge, OutboxItem, RelayLease, Stream
from backplane.store import OUTBOX


def snapshot() -> dict[str, Any]:
    """Return a JSON-able summary of the backplane's state, read from the database."""
    now = timezone.now()
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*) FILTER (WHERE stream_offset IS NULL), "
            f"count(*) FILTER (WHERE stream_offset IS NOT NULL AND forwarded_at IS NULL), count(*), "
            f"min(created_at) FILTER (WHERE forwarded_at IS NULL) FROM {OUTBOX}"
        )
        unassigned, unforwarded, total, oldest = cur.fetchone()
    if isinstance(oldest, str):
        from datetime import UTC, datetime

        oldest = datetime.fromisoformat(oldest).replace(tzinfo=UTC)
    lag = (now - oldest).total_seconds() if oldest else 0.0
    return {
        "outbox": {
            "rows": total,
            "unassigned": unassigned,
            "unforwarded": unforwarded,
            "oldest_pending_age_secs": round(lag, 3),
        },
        "leases": [
            {
                "shard": lease.shard,
                "holder": lease.holder,
                "heartbeat_age_secs": round((now - lease.heartbeat_at).total_seconds(), 1)
                if lease.heartbeat_at
                else None,
                "live": bool(lease.holder and lease.heartbeat_at and (now - lease.heartbeat_at).total_seconds() < 10),
                "forwarded_total": lease.forwarded_total,
            }
            for lease in RelayLease.objects.order_by("shard")
        ],
        "edges": [
            {
                "edge_id": e.edge_id,
                "host": e.host,
                "heartbeat_age_secs": round((now - e.heartbeat_at).total_seconds(), 1),
                "connections": e.n,
            }
            for e in Edge.objects.annotate(n=Count("connections")).order_by("edge_id")
        ],
        "connections": Connection.objects.filter(expires_at__gt=now).count(),
        "undeliverable_commands": [
            {
                "id": c.id,
                "type": c.type,
                "edge": c.stream[2:],
                "reason": c.undeliverable_reason,
                "created_at": c.created_at.isoformat(),
            }
            for c in OutboxItem.objects.filter(kind="command", undeliverable_reason__isnull=False).order_by("-id")[:20]
        ],
        "streams": dict(Stream.objects.values_list("audience").annotate(n=Count("key")).order_by()),
    }
