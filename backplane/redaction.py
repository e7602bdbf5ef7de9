"""Redact secrets from payloads before they are stored: by key name, by shape, by value.

The rules (docs/redaction.md):

- **Key names.** A key is split into words, at every character that is not an ASCII letter or
  digit, between letters and digits, and at camelCase humps (``X-API-Key`` → x, api, key;
  ``refreshToken`` → refresh, token), lower-cased. A pattern is split the same way and matches
  when its words appear in the key consecutively, as whole words; a pattern of several words also
  matches them run together (``api_key`` matches ``apikey``). A ``*`` at the start or end of a
  pattern lets its first or last word run on inside a longer one (``*token`` matches
  ``accesstoken``; ``pin`` does not match ``shipping``, nor ``auth`` ``author``).
- **Shapes.** In a list, a pair ``[name, value]`` whose name is secret-looking (an HTTP header
  list, ``[["Authorization", "…"]]``); an object ``{"name": …, "value": …}`` (or ``key``, or
  capitalised) whose name is secret-looking: the value is redacted.
- **Values**, whatever their key: a string that is a JWT, an RFC 6750 bearer credential
  (``Bearer …``) or a PEM private key.

Redacted values become ``"[REDACTED]"``. A secret handle (``backplane.secrets``) is never
redacted, wherever it is. Pure: no settings are read here; ``normalise_patterns`` compiles them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from backplane.secrets import REF_KEY, is_handle, is_ref

REDACTED = "[REDACTED]"

# The words of a key: an acronym (API in APIKey), a capitalised or lower-case word, a number.
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# Whole-value secrets. The first-character filter keeps the regex off almost every string.
_VALUE_FIRST = frozenset("eBb- \t\r\n")
_SECRET_VALUE = re.compile(
    r"[ \t\r\n]*(?:"
    r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*)?"  # JWS / JWE
    r"|[Bb][Ee][Aa][Rr][Ee][Rr][ \t]+[A-Za-z0-9\-._~+/]+=*"  # RFC 6750 b64token
    r"|-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*"
    r")[ \t\r\n]*",
    re.DOTALL,
)
# A tuple, not a union: isinstance is several times faster with one, on every value.
_CONTAINERS = (dict, list, tuple)
# Keys remembered per rule set; payloads repeat a small vocabulary, but keys may be data.
_MAX_REMEMBERED_KEYS = 4096


def words(name: str) -> list[str]:
    """The lower-cased words of a key or pattern (``X-API-Key`` → ``["x", "api", "key"]``)."""
    return [w.lower() for w in _WORDS.findall(name)]


def _pattern_regex(pattern: str) -> str:
    """The regex, over a key's words joined by ``_``, of one normalised pattern."""
    head = "[a-z0-9]*" if pattern.startswith("*") else ""
    tail = "[a-z0-9]*" if pattern.endswith("*") else ""
    body = "_?".join(re.escape(w) for w in pattern.strip("*").split("_"))
    return f"(?:^|_){head}{body}{tail}(?:_|$)"


class Rules(tuple[str, ...]):
    """Normalised key-name patterns (``*token``, ``api_key``) with their compiled matcher.

    A tuple, so it stands where the patterns did; build one with ``normalise_patterns``.
    """

    _regex: re.Pattern[str] | None
    _seen: dict[str, bool]

    def __new__(cls, patterns: Iterable[str]) -> Rules:
        rules = super().__new__(cls, patterns)
        rules._regex = re.compile("|".join(map(_pattern_regex, rules))) if rules else None
        rules._seen = {}
        return rules

    def is_secret_key(self, key: str) -> bool:
        """Whether the key (or the name in a name/value pair) ``key`` names a secret."""
        hit = self._seen.get(key)
        if hit is None:
            hit = self._regex is not None and self._regex.search("_".join(words(key))) is not None
            if len(self._seen) >= _MAX_REMEMBERED_KEYS:
                self._seen.clear()
            self._seen[key] = hit
        return hit


def normalise_patterns(patterns: Iterable[str]) -> Rules:
    """Compile configured patterns: each as its lower-cased words joined by ``_``, with its
    leading or trailing ``*`` kept; patterns without a word are dropped, repeats removed."""
    out: dict[str, None] = {}
    for pattern in patterns:
        core = "_".join(words(pattern))
        if core:
            out["*" * pattern.startswith("*") + core + "*" * pattern.endswith("*")] = None
    return Rules(out)


def is_secret_key(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``key`` names a secret under ``patterns`` (a ``Rules``, or plain patterns)."""
    return _rules(patterns).is_secret_key(key)


def is_secret_value(value: str) -> bool:
    """Whether the string ``value`` is itself a credential: a JWT, a bearer credential, a PEM key."""
    return value[:1] in _VALUE_FIRST and _SECRET_VALUE.fullmatch(value) is not None


def _rules(patterns: tuple[str, ...]) -> Rules:
    return patterns if isinstance(patterns, Rules) else normalise_patterns(patterns)


def redact(value: Any, patterns: tuple[str, ...]) -> Any:
    """Return ``value`` with its secrets replaced by ``REDACTED``; the input is not changed.

    ``patterns``: a ``Rules`` (``normalise_patterns``); a plain tuple is compiled on each call.
    When nothing needs redacting the very same object is returned, so callers can tell
    (``result is value``) without comparing. Tuples come back as lists.
    """
    if isinstance(value, str):
        return REDACTED if is_secret_value(value) else value
    if isinstance(value, _CONTAINERS):
        return _walk(value, _rules(patterns))
    return value


def _walk(value: dict[Any, Any] | list[Any] | tuple[Any, ...], rules: Rules) -> Any:
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        seen = rules._seen  # the key check inlined: it runs for every key of every payload
        for k, v in value.items():
            hit = seen.get(k)
            if hit is None:
                hit = isinstance(k, str) and rules.is_secret_key(k)
            if hit:
                # A handle stays; so does the "$secret_ref" key of one seen from inside.
                keep = is_handle(v) or (k == REF_KEY and len(value) == 1 and is_ref(v))
                new = v if keep else REDACTED
            elif isinstance(v, str):
                new = REDACTED if is_secret_value(v) else v
            elif isinstance(v, _CONTAINERS):
                new = _walk(v, rules)
            else:
                new = v
            if new is not v and out is None:
                out = dict(value)
            if out is not None:
                out[k] = new
        slot = "value" if "value" in value else "Value" if "Value" in value else None
        if slot is not None:
            name = value.get("name", value.get("key")) if slot == "value" else value.get("Name", value.get("Key"))
            if isinstance(name, str) and rules.is_secret_key(name) and not is_handle(value[slot]):
                out = dict(value) if out is None else out
                out[slot] = REDACTED
        return value if out is None else out
    items = []
    changed = not isinstance(value, list)
    for v in value:
        if isinstance(v, str):
            new = REDACTED if is_secret_value(v) else v
        elif isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and rules.is_secret_key(v[0]):
            new = v if is_handle(v[1]) else [v[0], REDACTED]
        elif isinstance(v, _CONTAINERS):
            new = _walk(v, rules)
        else:
            new = v
        changed = changed or new is not v
        items.append(new)
    return items if changed else value
