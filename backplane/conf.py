"""Backplane settings: one ``BACKPLANE`` dict in Django settings, read through ``conf``.

Each key is a typed attribute of ``Settings`` with its default, read from
``settings.BACKPLANE`` at every access (so ``override_settings`` applies at once). Values are
not converted here: ``backplane/checks.py`` validates them at ``manage.py check``, which is
what makes the annotations hold.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any, Generic, TypeVar, overload

from django.conf import settings

T = TypeVar("T")

# tyrum/settings.py's fallback; fine for the embedded mode, flagged (backplane.W001) in clusters.
DEVELOPMENT_SECRET_KEY = "tyrum-embedded-development-key-change-me"  # noqa: S105  (public on purpose)


class Setting(Generic[T]):
    """One ``BACKPLANE`` key: ``settings.BACKPLANE[name]`` when set, else ``default``."""

    def __init__(self, default: T) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Setting[T]: ...
    @overload
    def __get__(self, instance: Settings, owner: type) -> T: ...
    def __get__(self, instance: Settings | None, owner: type) -> Setting[T] | T:
        if instance is None:
            return self
        user = getattr(settings, "BACKPLANE", {}) or {}
        value: T = user.get(self.name, self.default)
        return value


def pattern_list(value: object) -> list[str]:
    """A pattern setting as a list: a string is read as comma-separated (from the environment)."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return list(value) if isinstance(value, list | tuple) else []


class PatternList(Setting[Sequence[str]]):
    """A pattern list read as the patterns in force: its own value, or its default, followed
    by ``<name>_EXTRA``'s. Setting the key replaces the defaults; the ``_EXTRA`` key adds."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.extra_name = name, f"{name}_EXTRA"

    @overload
    def __get__(self, instance: None, owner: type) -> PatternList: ...
    @overload
    def __get__(self, instance: Settings, owner: type) -> Sequence[str]: ...
    def __get__(self, instance: Settings | None, owner: type) -> PatternList | Sequence[str]:
        if instance is None:
            return self
        user = getattr(settings, "BACKPLANE", {}) or {}
        own, extra = user.get(self.name, self.default), user.get(self.extra_name)
        if not extra and isinstance(own, list | tuple):
            return own  # read on every publish: nothing built when nothing is added
        return pattern_list(own) + pattern_list(extra)


class Settings:
    """Typed access to ``settings.BACKPLANE`` with defaults; ``conf`` is its one instance."""

    __slots__ = ()  # no instance dict: assigning a setting raises instead of shadowing it

    # Relay shards: hash(tenant) mod SHARDS. Each shard has one active relay at a time.
    SHARDS: Setting[int] = Setting(16)
    # Largest payload accepted by publish(), in bytes of compact JSON.
    MAX_PAYLOAD_BYTES: Setting[int] = Setting(64 * 1024)
    # Rows claimed, and rows forwarded, per relay cycle.
    RELAY_BATCH_SIZE: Setting[int] = Setting(1000)
    # Relay's polling fallback when no doorbell rings. The embedded mode polls at most every
    # 250 ms because other processes (publish_event) cannot ring its in-process doorbell.
    RELAY_POLL_INTERVAL_SECS: Setting[float] = Setting(1.0)
    # How long a compactable row is kept after it was forwarded.
    RETENTION_SECS: Setting[float] = Setting(24 * 3600)
    # Compaction's row and payload-byte budgets beyond the retention window; None: no budget.
    COMPACT_MAX_ROWS: Setting[int | None] = Setting(None)
    COMPACT_MAX_BYTES: Setting[int | None] = Setting(None)
    # Rows deleted per compaction transaction: bounds each transaction's locks and WAL.
    COMPACT_BATCH_SIZE: Setting[int] = Setting(5000)
    # PostgreSQL time partitions of the outbox: width, and how many are made ahead.
    # Few partitions keep planning cheap; rows live up to retention + one interval.
    PARTITION_INTERVAL_SECS: Setting[int] = Setting(6 * 3600)
    PARTITIONS_AHEAD: Setting[int] = Setting(2)
    # A stream with no retained items, untouched this long and with no live socket, is
    # pruned; if it comes back it gets a new epoch.
    STREAM_PRUNE_GRACE_SECS: Setting[float] = Setting(7 * 24 * 3600)
    # Embedded mode: how often serve compacts.
    COMPACT_INTERVAL_SECS: Setting[float] = Setting(300)
    # Key-name patterns whose keys' values are redacted (backplane/redaction.py's rules). Set
    # here, this list replaces the defaults; read, it is the patterns in force (this + EXTRA).
    REDACT_PATTERNS: Setting[Sequence[str]] = PatternList(
        [
            "*password",
            "passwords",
            "*passwd",
            "pwd",
            "passphrase",
            "*secret",
            "secrets",
            "*token",
            "api_key",
            "*authorization",
            "auth",
            "bearer",
            "jwt",
            "*cookie",
            "cookies",
            "*credential",
            "credentials",
            "private_key",
            "session",
            "session_id",
            "*signature",
            "pin",
            "*otp",
        ]
    )
    # Patterns added to the defaults (or to REDACT_PATTERNS); a string is comma-separated.
    REDACT_PATTERNS_EXTRA: Setting[Sequence[str]] = Setting([])
    # Edge heartbeat; a third of the TTL-ish, so a couple of missed beats leave rows alive.
    HEARTBEAT_INTERVAL_SECS: Setting[float] = Setting(5.0)
    CONNECTION_TTL_SECS: Setting[float] = Setting(30.0)
    # How often an edge compares its streams' heads with what its peers got. A lag seen
    # on two checks in a row is filled from the outbox, so trailing loss heals in ~1 s.
    HEAD_CHECK_INTERVAL_SECS: Setting[float] = Setting(0.5)
    # PROTOCOL.md: hold live events for a new connection until its first frame or this.
    LIVE_HOLD_MS: Setting[int] = Setting(300)
    # Slow consumers: a socket whose unsent bytes pass this is closed with 4013; the peer
    # then has SLOW_CLOSE_GRACE_SECS to read up to the close frame before it is cut.
    MAX_OUTBOUND_BUFFER_BYTES: Setting[int] = Setting(4 * 1024 * 1024)
    SLOW_CLOSE_GRACE_SECS: Setting[float] = Setting(30.0)
    # Inbound frames: size cap (close 4009) and rate (close 4029).
    MAX_INBOUND_FRAME_BYTES: Setting[int] = Setting(64 * 1024)
    INBOUND_RATE_PER_SEC: Setting[float] = Setting(20.0)
    INBOUND_BURST: Setting[int] = Setting(60)
    # Largest number of events a resume replays; more answers retention_exceeded.
    MAX_REPLAY_EVENTS: Setting[int] = Setting(100_000)
    # Origins whose session cookie is accepted as an operator credential.
    ALLOWED_ORIGINS: Setting[Sequence[str]] = Setting([])
    # PostgreSQL: publish()'s statements are prepared once per database session
    # (docs/decisions/0009-prepared-publish-statements.md). Set False behind a pooler that
    # cannot carry prepared statements (PgBouncer in transaction mode before 1.21).
    PREPARED_STATEMENTS: Setting[bool] = Setting(True)

    def _get(self, name: str) -> Any:
        """The raw value of key ``name``, unvalidated (for the system checks)."""
        user = getattr(settings, "BACKPLANE", {}) or {}
        return user.get(name, DEFAULTS[name])

    @property
    def channel_prefix(self) -> str:
        return str(getattr(settings, "BACKPLANE_CHANNEL_PREFIX", "tyrum"))

    @property
    def redis_url(self) -> str:
        return str(getattr(settings, "REDIS_URL", "") or "")

    @property
    def embedded_layer(self) -> bool:
        """True when the channel layer lives in this process only."""
        backend: str = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        return backend == "channels.layers.InMemoryChannelLayer"

    @property
    def is_postgresql(self) -> bool:
        engine: str = settings.DATABASES["default"]["ENGINE"]
        return engine.startswith("django.db.backends.postgresql")


# Every key and its default, in declaration order: the checks' list of known keys.
DEFAULTS: dict[str, object] = {name: attr.default for name, attr in vars(Settings).items() if isinstance(attr, Setting)}


def edge_id(port: int | None = None) -> str:
    """Return this process's edge id: ``EDGE_ID`` or host name plus port (or pid)."""
    configured = getattr(settings, "EDGE_ID", "") or os.environ.get("EDGE_ID", "")
    if configured:
        return str(configured)
    host = socket.gethostname().split(".")[0] or "edge"
    suffix = str(port) if port else f"pid{os.getpid()}"
    return f"{host}-{suffix}"[:64]


conf = Settings()
