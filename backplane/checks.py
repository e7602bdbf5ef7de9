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
)
_POSITIVE_NUMBERS = (
    "RELAY_POLL_INTERVAL_SECS",
    "RETENTION_SECS",
    "COMPACT_INTERVAL_SECS",
    "HEARTBEAT_INTERVAL_SECS",
    "CONNECTION_TTL_SECS",
    "HEAD_CHECK_INTERVAL_SECS",
    "INBOUND_RATE_PER_SEC",
    "STREAM_PRUNE_GRACE_SECS",
    "SLOW_CLOSE_GRACE_SECS",
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
    for key in ("COMPACT_MAX_ROWS", "COMPACT_MAX_BYTES"):
        value = conf._get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            errors.append(
                Error(
                    f"BACKPLANE['{key}'] must be None or a positive integer.",
                    hint="None means no budget.",
                    id="backplane.E008",
                )
            )
    if not isinstance(conf._get("PREPARED_STATEMENTS"), bool):
        errors.append(
            Error(
                "BACKPLANE['PREPARED_STATEMENTS'] must be True or False.",
                hint="False only behind a pooler that cannot carry prepared statements.",
                id="backplane.E011",
            )
        )
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
    if not settings.DEBUG and settings.SECRET_KEY == DEVELOPMENT_SECRET_KEY and redis_url:
        errors.append(
            Warning(
                "SECRET_KEY is the public development key while DEBUG is off.",
                hint="Set SECRET_KEY in the environment for any cluster deployment.",
                id="backplane.W001",
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
