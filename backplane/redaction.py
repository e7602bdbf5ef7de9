"""Redact secret-looking keys from payloads before they are stored.

A key is secret-looking when, lower-cased with ``-`` read as ``_``, it contains one of
the configured patterns. Nested objects and lists are walked; the value becomes
``"[REDACTED]"``. Pure: no settings are read here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"


def normalise_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    return tuple(p.lower().replace("-", "_") for p in patterns if p)


@functools.lru_cache(maxsize=4096)  # payloads repeat a small vocabulary of keys
def is_secret_key(key: str, patterns: tuple[str, ...]) -> bool:
    name = key.lower().replace("-", "_")
    return any(p in name for p in patterns)


def redact(value: Any, patterns: tuple[str, ...]) -> Any:
    """Return ``value`` with secret-looking keys' values replaced; the input is not changed.

    When nothing needs redacting the very same object is returned, so callers can tell
    (``result is value``) without comparing.
    """
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for k, v in value.items():
            new = REDACTED if isinstance(k, str) and is_secret_key(k, patterns) else redact(v, patterns)
            if new is not v and out is None:
                out = dict(value)
            if out is not None:
                out[k] = new
        return value if out is None else out
    if isinstance(value, list | tuple):
        items = [redact(v, patterns) for v in value]
        if isinstance(value, list) and all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items
    return value
