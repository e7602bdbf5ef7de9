"""System checks for the ``BACKPLANE`` settings: ``manage.py check`` fails with an id and a hint."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from backplane import redaction
from backplane.conf import DEFAULTS, DEVELOPMENT_SECRET_KEY, Settings, conf, pattern_list

_POSITIVE_INTS = (
    "SHARDS",
    "MAX_PAYLOAD_BYTES",
    "RELAY_BATCH_SIZE",
    "COMPACT_BATCH_SIZE",
    "MAX_INBOUND_FRAME_BYTES",
    "INBOUND_BURST",
    "MAX_REPLAY_EVENTS",
    "LIVE_HOLD_MS",
    "PARTITION_INTERVAL_SECS",
    "MAX_OUTBOUND_BUFFER_BYTES",
    "PARTITIONS_AHEAD",
    "REPLAY_PAGE_EVENTS",
    "AUTH_FAILURE_BURST",
)
_POSITIVE_NUMBERS = (
    "RELAY_POLL_INTERVAL_SECS",
    "RETENTION_SECS",
    "COMPACT_INTERVAL_SECS",
    "HEARTBEAT_INTERVAL_SECS",
    "CONNECTION_TTL_SECS",
    "HEAD_CHECK_INTERVAL_SECS",
    "HEAD_CHECK_MARGIN_SECS",
    "HEAD_SWEEP_INTERVAL_SECS",
    "INBOUND_RATE_PER_SEC",
    "STREAM_PRUNE_GRACE_SECS",
    "SLOW_CLOSE_GRACE_SECS",
    "AUTH_FAILURES_PER_MINUTE",
    "REQUEST_HEADER_TIMEOUT_SECS",
    "TOKEN_LIFETIME_SECS",
    "TOKEN_ROTATION_GRACE_SECS",
)


@register()
def check_backplane_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    user = getattr(settings, "BACKPLANE", {})
    if not isinstance(user, dict):
        return [Error("BACKPLANE must be a dict.", hint="Set BACKPLANE = {...} in settings.", id="backplane.E001")]
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        errors.append(
            Error(
                f"Unknown BACKPLANE keys: {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="backplane.E002",
            )
        )
    for key in _POSITIVE_INTS:
        value = conf._get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            errors.append(
                Error(
                    f"BACKPLANE['{key}'] must be a positive integer, not {value!r}.",
                    hint=f"The default is {DEFAULTS[key]!r}.",
                    id="backplane.E003",
                )
            )
    for key in _POSITIVE_NUMBERS:
        value = conf._get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            errors.append(
                Error(
                    f"BACKPLANE['{key}'] must be a positive number, not {value!r}.",
                    hint=f"The default is {DEFAULTS[key]!r}.",
                    id="backplane.E004",
                )
            )
    hb, ttl = conf._get("HEARTBEAT_INTERVAL_SECS"), conf._get("CONNECTION_TTL_SECS")
    if isinstance(hb, int | float) and isinstance(ttl, int | float) and hb * 2 >= ttl:
        errors.append(
            Error(
                "CONNECTION_TTL_SECS must be more than twice HEARTBEAT_INTERVAL_SECS.",
                hint="Two missed beats must still leave a live connection's row alive.",
                id="backplane.E005",
            )
        )
    patterns = conf._get("REDACT_PATTERNS")
    if not _strings(patterns):
        errors.append(
            Error(
                "BACKPLANE['REDACT_PATTERNS'] must be a list of non-empty strings.",
                hint="For example ['password', 'secret', 'token'].",
                id="backplane.E006",
            )
        )
    errors += _check_redact_patterns(patterns)
    origins = conf._get("ALLOWED_ORIGINS")
    if not isinstance(origins, list | tuple) or not all(isinstance(o, str) and "://" in o for o in origins):
        errors.append(
            Error(
                "BACKPLANE['ALLOWED_ORIGINS'] must be a list of origins like 'https://ops.example'.",
                hint="Set BACKPLANE_ALLOWED_ORIGINS=https://a,https://b.",
                id="backplane.E007",
            )
        )
    for key in ("COMPACT_MAX_ROWS", "COMPACT_MAX_BYTES", "MAX_CONNECTIONS_PER_TOKEN", "MAX_CONNECTIONS_PER_TENANT"):
        value = conf._get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            errors.append(
                Error(
                    f"BACKPLANE['{key}'] must be None or a positive integer.",
                    hint="None means no limit.",
                    id="backplane.E008",
                )
            )
    for key, hint in (
        ("PREPARED_STATEMENTS", "False only behind a pooler that cannot carry prepared statements."),
        ("PUBLISH_AT_COMMIT", "False sends each publish() at once, as its own statement."),
    ):
        if not isinstance(conf._get(key), bool):
            errors.append(Error(f"BACKPLANE['{key}'] must be True or False.", hint=hint, id="backplane.E011"))
    layer = getattr(settings, "BACKPLANE_LAYER", "pubsub")
    if layer not in ("pubsub", "core"):
        errors.append(
            Error(
                f"BACKPLANE_LAYER must be 'pubsub' or 'core', not {layer!r}.",
                hint="Unset it for the default pub/sub layer.",
                id="backplane.E009",
            )
        )
    redis_url = getattr(settings, "REDIS_URL", "")
    if redis_url and not str(redis_url).startswith(("redis://", "rediss://", "unix://")):
        errors.append(
            Error(
                "REDIS_URL must start with redis://, rediss:// or unix://.",
                hint="For example redis://127.0.0.1:6379/0.",
                id="backplane.E010",
            )
        )
    errors.extend(_check_redis_keys())

    if "default" not in getattr(settings, "CHANNEL_LAYERS", {}):
        errors.append(
            Error(
                "CHANNEL_LAYERS has no 'default' layer: edges and the relay have no transport.",
                hint="In one process: {'default': {'BACKEND': 'channels.layers.InMemoryChannelLayer'}}; "
                "in a cluster, channels_redis.pubsub.RedisPubSubChannelLayer (docs/install.md).",
                id="backplane.E060",
            )
        )
    elif not conf.embedded_layer and not conf.redis_url:
        errors.append(
            Warning(
                "The channel layer is not in-process, but the relay's doorbell finds no Redis URL in "
                "REDIS_URL or CHANNEL_LAYERS: relays will poll (RELAY_POLL_INTERVAL_SECS) instead of waking.",
                hint="Set REDIS_URL to the channel layer's Redis (a Sentinel layer has no single URL).",
                id="backplane.W060",
            )
        )
    if not settings.DEBUG and settings.SECRET_KEY == DEVELOPMENT_SECRET_KEY and redis_url:
        errors.append(
            Warning(
                "SECRET_KEY is the public development key while DEBUG is off.",
                hint="Set SECRET_KEY in the environment for any cluster deployment.",
                id="backplane.W001",
            )
        )
    errors.extend(_check_credentials())
    return errors


def _check_credentials() -> list[CheckMessage]:
    """Operator sessions that a logout cannot end (W020)."""
    if conf._get("ALLOWED_ORIGINS") and settings.SESSION_ENGINE == "django.contrib.sessions.backends.signed_cookies":
        return [
            Warning(
                "Operator sockets authenticated by a signed-cookie session cannot be closed on logout.",
                hint="Use a server-side SESSION_ENGINE (db, cached_db, cache or file).",
                id="backplane.W020",
            )
        ]
    return []


# A key shorter than this could be guessed offline from one captured message.
MIN_REDIS_KEY_CHARS = 32


def _check_redis_keys() -> list[CheckMessage]:
    """A channels-redis layer encrypts with keys, or the Redis network is declared trusted."""
    errors: list[CheckMessage] = []
    trusted = conf._get("REDIS_TRUSTED")
    if not isinstance(trusted, bool):
        errors.append(
            Error(
                f"BACKPLANE['REDIS_TRUSTED'] must be True or False, not {trusted!r}.",
                hint="Set BACKPLANE_REDIS_TRUSTED=true, or leave it unset.",
                id="backplane.E032",
            )
        )
    layer = settings.CHANNEL_LAYERS.get("default", {})
    if not str(layer.get("BACKEND", "")).startswith("channels_redis."):
        return errors
    keys = (layer.get("CONFIG") or {}).get("symmetric_encryption_keys") or []
    if not keys and trusted is not True:
        errors.append(
            Error(
                "The channel layer sends every payload and command over Redis unencrypted and "
                "unauthenticated: anyone who reaches Redis can read them and forge events.",
                hint="Set BACKPLANE_REDIS_KEYS to one or more random keys of 32+ characters "
                "(the same on every relay and edge), or BACKPLANE_REDIS_TRUSTED=true if only "
                "the backplane can reach Redis.",
                id="backplane.E030",
            )
        )
    if any(not isinstance(key, str | bytes) or len(key) < MIN_REDIS_KEY_CHARS for key in keys):
        errors.append(
            Error(
                f"Every key of BACKPLANE_REDIS_KEYS must have at least {MIN_REDIS_KEY_CHARS} characters.",
                hint='Make one with: python -c "import secrets; print(secrets.token_urlsafe(32))".',
                id="backplane.E031",
            )
        )
    return errors


def _check_redact_patterns(patterns: Any) -> list[CheckMessage]:
    """E040, E041, W040: the extra patterns' shape; patterns naming no word; defaults left out."""
    messages: list[CheckMessage] = []
    extra = conf._get("REDACT_PATTERNS_EXTRA")
    extra_ok = isinstance(extra, str) or _strings(extra)
    if not extra_ok:
        messages.append(
            Error(
                "BACKPLANE['REDACT_PATTERNS_EXTRA'] must be a list of non-empty strings.",
                hint='For example BACKPLANE_REDACT_PATTERNS_EXTRA=\'["ssn", "card_number"]\' or ssn,card_number.',
                id="backplane.E040",
            )
        )
    listed = [*(patterns if _strings(patterns) else []), *(pattern_list(extra) if extra_ok else [])]
    wordless = [p for p in listed if not redaction.words(p) or "*" in p.strip("*")]
    if wordless:
        messages.append(
            Error(
                f"Redaction patterns {wordless!r} name no word, or have a '*' inside.",
                hint="A pattern is one or more words (api_key, refreshToken), with at most a '*' at either end.",
                id="backplane.E041",
            )
        )
    default = Settings.REDACT_PATTERNS.default
    dropped = [p for p in default if p not in patterns] if _strings(patterns) and patterns is not default else []
    if dropped:
        messages.append(
            Warning(
                f"BACKPLANE['REDACT_PATTERNS'] replaces the default patterns and leaves out {', '.join(dropped)}.",
                hint="Set REDACT_PATTERNS_EXTRA instead to add patterns to the defaults.",
                id="backplane.W040",
            )
        )
    return messages


def _strings(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(p, str) and p for p in value)
