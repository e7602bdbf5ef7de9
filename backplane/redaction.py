"""Redact secret-looking keys from payloads before they are stored.

A key is secret-looking when, lower-cased with ``-`` read as ``_``, it contains one of
the configured patterns. Nested objects and lists are walked; the value becomes
``"[REDACTED]"``. Pure: no settings are read here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"


def normalise_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    return tuple(p.lower().replace("-", "_") for p in patterns if p)


def is_secret_key(key: str, patterns: tuple[str, ...]) -> bool:
    name = key.lower().replace("-", "_")
    return any(p in name for p in patterns)


def redact(value: Any, patterns: tuple[str, ...]) -> Any:
    """Return ``value`` with secret-looking keys' values replaced; the input is not changed."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k, patterns) else redact(v, patterns))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, patterns) for v in value]
    return value
