"""Backplane settings: one ``BACKPLANE`` dict in Django settings, read through ``conf``.

Every key has a default here; ``backplane/checks.py`` validates them at ``manage.py check``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from django.conf import settings

# tyrum/settings.py's fallback; fine for the embedded mode, flagged (backplane.W001) in clusters.
DEVELOPMENT_SECRET_KEY = "tyrum-embedded-development-key-change-me"  # noqa: S105  (public on purpose)

DEFAULTS: dict[str, Any] = {
    # Relay shards: hash(tenant) mod SHARDS. Each shard has one active relay at a time.
    "SHARDS": 16,
    # Largest payload accepted by publish(), in bytes of compact JSON.
    "MAX_PAYLOAD_BYTES": 64 * 1024,
    # Rows claimed, and rows forwarded, per relay cycle.
    "RELAY_BATCH_SIZE": 1000,
    # Relay's polling fallback when no doorbell rings. The embedded mode polls at most every
    # 250 ms because other processes (publish_event) cannot ring its in-process doorbell.
    "RELAY_POLL_INTERVAL_SECS": 1.0,
    # How long a compactable row is kept after it was forwarded (issue 3 refines budgets).
    "RETENTION_SECS": 24 * 3600,
    "COMPACT_MAX_ROWS": None,
    "COMPACT_MAX_BYTES": None,
    "COMPACT_BATCH_SIZE": 5000,
    # PostgreSQL time partitions of the outbox: width, and how many are made ahead.
    # Few partitions keep planning cheap; rows live up to retention + one interval.
    "PARTITION_INTERVAL_SECS": 6 * 3600,
    "PARTITIONS_AHEAD": 2,
    # A stream with no retained items, untouched this long and with no live socket, is
    # pruned; if it comes back it gets a new epoch.
    "STREAM_PRUNE_GRACE_SECS": 7 * 24 * 3600,
    # Embedded mode: how often serve compacts.
    "COMPACT_INTERVAL_SECS": 300,
    # Keys whose lower-cased, '-'→'_' name contains one of these are redacted.
    "REDACT_PATTERNS": [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "cookie",
        "private_key",
        "credential",
    ],
    # Edge heartbeat; a third of the TTL-ish, so a couple of missed beats leave rows alive.
    "HEARTBEAT_INTERVAL_SECS": 5.0,
    "CONNECTION_TTL_SECS": 30.0,
    # How often an edge compares its streams' heads with what its peers got. A lag seen
    # on two checks in a row is filled from the outbox, so trailing loss heals in ~1 s.
    "HEAD_CHECK_INTERVAL_SECS": 0.5,
    # PROTOCOL.md: hold live events for a new connection until its first frame or this.
    "LIVE_HOLD_MS": 300,
    # Slow consumers: a socket whose unsent bytes pass this is closed with 4013; the peer
    # then has SLOW_CLOSE_GRACE_SECS to read up to the close frame before it is cut.
    "MAX_OUTBOUND_BUFFER_BYTES": 4 * 1024 * 1024,
    "SLOW_CLOSE_GRACE_SECS": 30.0,
    # Inbound frames: size cap (close 4009) and rate (close 4029).
    "MAX_INBOUND_FRAME_BYTES": 64 * 1024,
    "INBOUND_RATE_PER_SEC": 20.0,
    "INBOUND_BURST": 60,
    # Largest number of events a resume replays; more answers retention_exceeded.
    "MAX_REPLAY_EVENTS": 100_000,
    # Origins whose session cookie is accepted as an operator credential.
    "ALLOWED_ORIGINS": [],
    # PostgreSQL: publish()'s statements are prepared once per database session (planning
    # them was a third of publish()'s cost). Set False behind a pooler that cannot carry
    # prepared statements (PgBouncer in transaction mode before 1.21).
    "PREPARED_STATEMENTS": True,
}


class Settings:
    """Typed access to ``settings.BACKPLANE`` with defaults."""

    def _get(self, name: str) -> Any:
        user = getattr(settings, "BACKPLANE", {}) or {}
        return user.get(name, DEFAULTS[name])

    def __getattr__(self, name: str) -> Any:
        if name in DEFAULTS:
            return self._get(name)
        raise AttributeError(name)

    @property
    def channel_prefix(self) -> str:
        return str(getattr(settings, "BACKPLANE_CHANNEL_PREFIX", "tyrum"))

    @property
    def redis_url(self) -> str:
        return str(getattr(settings, "REDIS_URL", "") or "")

    @property
    def embedded_layer(self) -> bool:
        """True when the channel layer lives in this process only."""
        backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        return backend == "channels.layers.InMemoryChannelLayer"

    @property
    def is_postgresql(self) -> bool:
        return settings.DATABASES["default"]["ENGINE"].startswith("django.db.backends.postgresql")


def edge_id(port: int | None = None) -> str:
    """Return this process's edge id: ``EDGE_ID`` or host name plus port (or pid)."""
    configured = getattr(settings, "EDGE_ID", "") or os.environ.get("EDGE_ID", "")
    if configured:
        return configured
    host = socket.gethostname().split(".")[0] or "edge"
    suffix = str(port) if port else f"pid{os.getpid()}"
    return f"{host}-{suffix}"[:64]


conf = Settings()
