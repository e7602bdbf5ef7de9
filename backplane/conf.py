"""Backplane settings: one ``BACKPLANE`` dict in Django settings, read through ``conf``.

Each key is a typed attribute of ``Settings`` with its default, read from
``settings.BACKPLANE`` at every access (so ``override_settings`` applies at once). Values are
not converted here: ``backplane/checks.py`` validates them at ``manage.py check``, which is
what makes the annotations hold.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar, overload
from urllib.parse import quote

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
    # Each check reads only the streams whose head moved since the last one, by the database's
    # clock less this margin (a relay's transaction in flight commits a head stamped earlier);
    # every HEAD_SWEEP_INTERVAL_SECS it reads every connected stream's head
    # (docs/decisions/0027-head-check-change-feed.md).
    HEAD_CHECK_MARGIN_SECS: Setting[float] = Setting(2.0)
    HEAD_SWEEP_INTERVAL_SECS: Setting[float] = Setting(30.0)
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
    # A replay or a gap fill reads the outbox this many events at a time, sending each page
    # before reading the next: a resume holds at most one page (plus the outbound bound).
    REPLAY_PAGE_EVENTS: Setting[int] = Setting(1000)
    # Connection caps, cluster-wide (counted in the directory at each handshake; over a cap
    # the upgrade is refused with HTTP 429). None: no cap. The tenant count reads every live
    # connection row of the tenant, so leave it off for tenants of thousands of sockets.
    MAX_CONNECTIONS_PER_TOKEN: Setting[int | None] = Setting(32)
    MAX_CONNECTIONS_PER_TENANT: Setting[int | None] = Setting(None)
    # Failed authentications per client address (this edge): a burst, then this many a
    # minute; past it, upgrades from the address get 429 before any database query.
    AUTH_FAILURE_BURST: Setting[int] = Setting(20)
    AUTH_FAILURES_PER_MINUTE: Setting[float] = Setting(30.0)
    # A client must send its request's headers within this (slow-header attacks).
    REQUEST_HEADER_TIMEOUT_SECS: Setting[float] = Setting(10.0)
    # Origins whose session cookie is accepted as an operator credential.
    ALLOWED_ORIGINS: Setting[Sequence[str]] = Setting([])
    # Lifetime of a new token unless one is asked for (or none, explicitly): a leaked token
    # that nobody revokes still stops working. 90 days: a quarterly rotation.
    TOKEN_LIFETIME_SECS: Setting[float] = Setting(90 * 24 * 3600)
    # After a rotation the old token stays valid this long (by default), so devices can pick
    # up the new one.
    TOKEN_ROTATION_GRACE_SECS: Setting[float] = Setting(24 * 3600)
    # PostgreSQL: publish()'s statements are prepared once per database session
    # (docs/decisions/0009-prepared-publish-statements.md). Set False behind a pooler that
    # cannot carry prepared statements (PgBouncer in transaction mode before 1.21).
    PREPARED_STATEMENTS: Setting[bool] = Setting(True)
    # PostgreSQL: publish() inside a transaction is sent with the transaction's COMMIT (or
    # before its next statement), not as a statement of its own
    # (docs/decisions/0030-publish-rides-the-commit.md). False: at once, as before.
    PUBLISH_AT_COMMIT: Setting[bool] = Setting(True)
    # Redis carries every payload and the directed commands, encrypted and authenticated with
    # the keys of channel_layers(); a cluster without keys must say its Redis network is
    # trusted (backplane.E030), so a missing key is never silent.
    REDIS_TRUSTED: Setting[bool] = Setting(False)

    def _get(self, name: str) -> Any:
        """The raw value of key ``name``, unvalidated (for the system checks)."""
        user = getattr(settings, "BACKPLANE", {}) or {}
        return user.get(name, DEFAULTS[name])

    @property
    def channel_prefix(self) -> str:
        return str(getattr(settings, "BACKPLANE_CHANNEL_PREFIX", "tyrum"))

    @property
    def redis_url(self) -> str:
        """``REDIS_URL``, else the Redis of ``CHANNEL_LAYERS`` (``layer_redis_url``); '' for none."""
        return str(getattr(settings, "REDIS_URL", "") or "") or layer_redis_url(getattr(settings, "CHANNEL_LAYERS", {}))

    @property
    def embedded_layer(self) -> bool:
        """True when the channel layer lives in this process only."""
        backend: str = getattr(settings, "CHANNEL_LAYERS", {}).get("default", {}).get("BACKEND", "")
        return backend == "channels.layers.InMemoryChannelLayer"

    @property
    def is_postgresql(self) -> bool:
        engine: str = settings.DATABASES["default"]["ENGINE"]
        return engine.startswith("django.db.backends.postgresql")


# Every key and its default, in declaration order: the checks' list of known keys.
DEFAULTS: dict[str, object] = {name: attr.default for name, attr in vars(Settings).items() if isinstance(attr, Setting)}


# The environment variable holding the channel layer's keys, comma-separated: the first
# encrypts, every one decrypts (rotation: add the new key second, then move it first).
REDIS_KEYS_ENV = "BACKPLANE_REDIS_KEYS"
# A message older than this (by its sender's clock) is refused as a replay; channels-redis
# adds 10 s of leeway. Pub/sub delivers in milliseconds, so only clock skew eats into it.
MESSAGE_MAX_AGE_SECS = 60


def redis_keys(raw: str | None = None) -> list[str]:
    """The channel layer's keys from ``raw`` (default: the ``BACKPLANE_REDIS_KEYS`` variable)."""
    if raw is None:
        raw = os.environ.get(REDIS_KEYS_ENV, "")
    return [key.strip() for key in raw.split(",") if key.strip()]


def channel_layers(
    redis_url: str, *, prefix: str, layer: str = "pubsub", keys: Sequence[str] = (), capacity: int = 1000
) -> dict[str, dict[str, Any]]:
    """``CHANNEL_LAYERS`` for the backplane: the in-process layer without ``redis_url``, else
    channels-redis (``layer``: ``pubsub``, the default, or ``core``), its messages encrypted
    and authenticated with ``keys`` (Fernet: the first encrypts, all decrypt) and refused past
    ``MESSAGE_MAX_AGE_SECS``. No keys: plaintext, which ``manage.py check`` refuses (E030)
    unless ``BACKPLANE["REDIS_TRUSTED"]`` says the Redis network is trusted."""
    if not redis_url:
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    encryption: dict[str, Any] = {"symmetric_encryption_keys": list(keys)} if keys else {}
    if layer == "core":
        config: dict[str, Any] = {
            # redis-py's default 5 s socket timeout equals the layer's 5 s blocking receive,
            # which kills idle consumers; and its pool of 100 refuses a connect storm
            # instead of waiting (DESIGN.md, known pitfalls).
            "hosts": [{"address": redis_url, "socket_timeout": 30, "max_connections": 10_000}],
            "prefix": f"{prefix}:",
            "capacity": capacity,
            # Also the age past which the core layer's serializer refuses a message.
            "expiry": MESSAGE_MAX_AGE_SECS,
            "group_expiry": 86400,
            **encryption,
        }
        return {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": config}}
    from backplane.vendor.channels_redis import register_serializer

    # At-most-once transport; the outbox and the edge's per-stream check make it safe (gaps
    # are filled from the outbox). It ignores the database number, so the prefix is what
    # separates deployments sharing one Redis.
    config = {"hosts": [redis_url], "prefix": f"{prefix}:", **encryption}
    if keys:
        config["serializer_format"] = register_serializer(MESSAGE_MAX_AGE_SECS)
    return {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": config}}


def edge_id(port: int | None = None) -> str:
    """Return this process's edge id: ``EDGE_ID`` or host name plus port (or pid)."""
    configured = getattr(settings, "EDGE_ID", "") or os.environ.get("EDGE_ID", "")
    if configured:
        return str(configured)
    host = socket.gethostname().split(".")[0] or "edge"
    suffix = str(port) if port else f"pid{os.getpid()}"
    return f"{host}-{suffix}"[:64]


conf = Settings()


# BACKPLANE_* variables that are not BACKPLANE keys: the host's settings (or the process) read them.
ENVIRONMENT_VARIABLES = frozenset(
    {
        "BACKPLANE_CHANNEL_PREFIX",  # settings.BACKPLANE_CHANNEL_PREFIX: every Redis key and channel
        "BACKPLANE_LAYER",  # tyrum/settings.py: the channels-redis layer, pubsub or core
        "BACKPLANE_LAYER_CAPACITY",  # tyrum/settings.py: the core layer's per-channel capacity
        "BACKPLANE_FAILPOINT",  # the fault-matrix tests' crash points (relay.py)
        "BACKPLANE_REDIS_KEYS",  # tyrum/settings.py: the keys encrypting every message on Redis
        "BACKPLANE_EVENT_LOOP",  # backplane/process.py: uvloop or asyncio under relays and edges
    }
)


def from_environment(environ: Mapping[str, str]) -> dict[str, object]:
    """Return the ``BACKPLANE`` keys set as ``BACKPLANE_<KEY>=<value>`` in ``environ``.

    A value is read as JSON (``BACKPLANE_RETENTION_SECS=60``, ``BACKPLANE_REDACT_PATTERNS='["pin"]'``),
    else as comma-separated items for a list key (``BACKPLANE_ALLOWED_ORIGINS=https://a,https://b``),
    else as a string; ``manage.py check`` validates it either way. Variables that name
    no key (a Kubernetes Service called ``backplane`` injects ``BACKPLANE_SERVICE_HOST`` and
    ``BACKPLANE_PORT``) are ignored with one warning, never an error: every command must still run.
    """
    found: dict[str, object] = {}
    unknown: list[str] = []
    for name, raw in environ.items():
        if not name.startswith("BACKPLANE_") or name in ENVIRONMENT_VARIABLES:
            continue
        key = name[len("BACKPLANE_") :]
        if key not in DEFAULTS:
            unknown.append(name)
            continue
        try:
            found[key] = json.loads(raw)
        except ValueError:  # a list key also takes comma-separated values
            is_list = isinstance(DEFAULTS[key], list | tuple)
            found[key] = [item.strip() for item in raw.split(",") if item.strip()] if is_list else raw
    if unknown:
        logging.getLogger(__name__).warning(
            "ignoring environment variables that name no BACKPLANE setting: %s",
            ", ".join(sorted(unknown)),
            extra={"action": "unknown_environment"},
        )
    return found


def layer_redis_url(layers: Mapping[str, Any]) -> str:
    """Return the Redis URL of the ``default`` channel layer's first host, '' when it has none.

    A host project that configures only ``CHANNEL_LAYERS`` gets the doorbell and the relay's
    pipelined publisher on the same Redis. A Sentinel layer has no single URL: '' (check W060).
    """
    config = (layers.get("default") or {}).get("CONFIG") or {}
    hosts = config.get("hosts") or []
    if not hosts:
        return ""
    host = hosts[0]
    if isinstance(host, dict):
        if "master_name" in host or "sentinels" in host:
            return ""
        address = host.get("address") or (host.get("host"), host.get("port", 6379))
        if isinstance(address, str):
            return address
        password = host.get("password")
        host = address
    else:
        password = None
    if isinstance(host, str):
        return host
    if isinstance(host, list | tuple) and len(host) == 2 and host[0]:
        auth = f":{quote(str(password), safe='')}@" if password else ""
        return f"redis://{auth}{host[0]}:{host[1]}"
    return ""
