"""What ``backplane_status`` and the admin show: backlog, lag, leases, edges, streams; and the
``--check`` verdict for alerting (``check``).

Every read is bounded on a large outbox: backlog counts stop at ``BACKLOG_COUNT_CAP`` (the
partial indexes of unassigned and unforwarded rows make them cheap), the row total is the
planner's estimate on PostgreSQL, and the oldest pending row is found through those indexes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import connection
from django.db.models import Count, Q
from django.utils import timezone

from backplane.conf import conf
from backplane.models import Connection, Edge, OutboxItem, RelayLease, Stream
from backplane.store import OUTBOX

# Backlog counts stop here: past it, "more than" is all an operator needs.
BACKLOG_COUNT_CAP = 1_000_000
# A lease row whose holder reported within this long is live (relays report every 2 s and
# clear their rows when they stop).
LEASE_LIVE_SECS = 10.0

OK, WARNING, CRITICAL = 0, 1, 2
LEVELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}


def backlog() -> dict[str, Any]:
    """Rows waiting for the relay (capped counts) and the age of the oldest, in seconds."""
    cap = BACKLOG_COUNT_CAP
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {OUTBOX} WHERE stream_offset IS NULL LIMIT %s) a), "
            f"(SELECT count(*) FROM (SELECT 1 FROM {OUTBOX} WHERE stream_offset IS NOT NULL "
            f"AND forwarded_at IS NULL LIMIT %s) b), "
            f"(SELECT created_at FROM {OUTBOX} WHERE stream_offset IS NULL ORDER BY id LIMIT 1), "
            f"(SELECT min(created_at) FROM {OUTBOX} WHERE stream_offset IS NOT NULL AND forwarded_at IS NULL)",
            [cap, cap],
        )
        unassigned, unforwarded, *oldest = cur.fetchone()
    times = [_aware(t) for t in oldest if t is not None]
    age = (timezone.now() - min(times)).total_seconds() if times else 0.0
    return {
        "unassigned": int(unassigned),
        "unforwarded": int(unforwarded),
        "capped": max(unassigned, unforwarded) >= cap,
        "oldest_pending_age_secs": round(max(0.0, age), 3),
    }


def estimated_rows() -> int:
    """The outbox's row count: the planner's estimate on PostgreSQL (no full scan), exact elsewhere."""
    with connection.cursor() as cur:
        if conf.is_postgresql:
            cur.execute(
                "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0) FROM pg_class c WHERE c.oid = %s::regclass "
                "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = %s::regclass)",
                [OUTBOX, OUTBOX],
            )
        else:
            cur.execute(f"SELECT count(*) FROM {OUTBOX}")
        return int(cur.fetchone()[0])


def _aware(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite
        value = datetime.fromisoformat(value)
    moment: datetime = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return moment


def snapshot() -> dict[str, Any]:
    """Return a JSON-able summary of the backplane's state, read from the database."""
    now = timezone.now()
    box = backlog()
    return {
        "outbox": {"rows_estimate": estimated_rows(), **box},
        "leases": [
            {
                "shard": lease.shard,
                "holder": lease.holder,
                "heartbeat_age_secs": round((now - lease.heartbeat_at).total_seconds(), 1)
                if lease.heartbeat_at
                else None,
                "live": bool(
                    lease.holder and lease.heartbeat_at and (now - lease.heartbeat_at).total_seconds() < LEASE_LIVE_SECS
                ),
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
            for e in Edge.objects.annotate(n=Count("connections", filter=Q(connections__expires_at__gt=now))).order_by(
                "edge_id"
            )
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


def collapse_leases(leases: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Group consecutive shards in the same state (holder, liveness) into one line each:
    ``("0-7", lease)`` where ``lease`` is the first shard's row."""
    out: list[tuple[list[int], dict[str, Any]]] = []
    for lease in leases:
        if out and out[-1][1]["holder"] == lease["holder"] and out[-1][1]["live"] == lease["live"]:
            if out[-1][0][-1] == lease["shard"] - 1:
                out[-1][0].append(lease["shard"])
                continue
        out.append(([lease["shard"]], lease))
    return [(f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]), lease) for s, lease in out]


@dataclass(frozen=True)
class Thresholds:
    """What ``check`` alerts on: (warning, critical) for each; None turns one off."""

    lag_rows: tuple[int, int] = (10_000, 100_000)
    pending_age_secs: tuple[float, float] = (30.0, 120.0)
    shards_unleased: tuple[int, int] = (1, 1)
    dead_edge_secs: float = 30.0


@dataclass
class Verdict:
    """The outcome of ``check``: the worst level and one line per problem."""

    level: int = OK
    problems: list[str] = field(default_factory=list)

    def add(self, level: int, line: str) -> None:
        self.level = max(self.level, level)
        self.problems.append(f"{LEVELS[level]}: {line}")


def _grade(value: float, limits: tuple[float, float]) -> int:
    return CRITICAL if value >= limits[1] else WARNING if value >= limits[0] else OK


def check(limits: Thresholds, ping: Any = None) -> Verdict:
    """Judge the backplane's state against ``limits``. A database or Redis outage is one
    critical line, never an exception. ``ping()`` raises when Redis is unreachable
    (default: ping ``REDIS_URL`` when one is set)."""
    verdict = Verdict()
    try:
        (ping or redis_ping)()
    except Exception as exc:
        verdict.add(CRITICAL, f"redis unreachable ({type(exc).__name__})")
    try:
        box = backlog()
        now = timezone.now()
        leases = {lease.shard: lease for lease in RelayLease.objects.all()}
        edges = list(Edge.objects.values_list("edge_id", "heartbeat_at"))
    except Exception as exc:
        verdict.add(CRITICAL, f"database unreachable ({type(exc).__name__})")
        return verdict
    lag = box["unassigned"] + box["unforwarded"]
    level = _grade(lag, limits.lag_rows)
    if level:
        verdict.add(level, f"outbox lag {lag} rows (warning {limits.lag_rows[0]}, critical {limits.lag_rows[1]})")
    age = box["oldest_pending_age_secs"]
    level = _grade(age, limits.pending_age_secs)
    if level:
        verdict.add(
            level,
            f"oldest pending event {age:.0f}s old (warning {limits.pending_age_secs[0]:.0f}s, "
            f"critical {limits.pending_age_secs[1]:.0f}s)",
        )
    unleased = [shard for shard in range(conf.SHARDS) if not _live(leases.get(shard), now)]
    level = _grade(len(unleased), limits.shards_unleased)
    if level:
        verdict.add(level, f"{len(unleased)} of {conf.SHARDS} shards without a live relay: {_ranges(unleased)}")
    dead = sorted(eid for eid, beat in edges if beat is None or (now - beat).total_seconds() >= limits.dead_edge_secs)
    if dead:
        verdict.add(WARNING, f"{len(dead)} edges silent for {limits.dead_edge_secs:.0f}s or more: {', '.join(dead)}")
    return verdict


def _live(lease: RelayLease | None, now: datetime) -> bool:
    beat = lease.heartbeat_at if lease is not None else None
    return bool(lease and lease.holder and beat and (now - beat).total_seconds() < LEASE_LIVE_SECS)


def _ranges(shards: list[int]) -> str:
    parts: list[list[int]] = []
    for shard in shards:
        if parts and parts[-1][-1] == shard - 1:
            parts[-1].append(shard)
        else:
            parts.append([shard])
    return ",".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def redis_ping() -> None:
    """Raise when Redis (``REDIS_URL``) does not answer a PING within 2 s; nothing without one."""
    url = conf.redis_url
    if not url:
        return  # the embedded mode has no Redis
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    finally:
        client.close()
