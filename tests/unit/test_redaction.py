"""Unit tests of ``backplane.redaction`` against the DESIGN.md rule.

A key is secret-looking when, lower-cased with ``-`` read as ``_``, it contains a configured
pattern; nested objects and lists are walked; the value becomes ``"[REDACTED]"``; the input
is not changed.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from backplane.conf import DEFAULTS
from backplane.redaction import REDACTED, is_secret_key, normalise_patterns, redact

PATTERNS = normalise_patterns(DEFAULTS["REDACT_PATTERNS"])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
keys = st.text(max_size=12) | st.sampled_from(
    ["password", "Password", "X-API-Key", "api-key", "user_token", "SESSION_COOKIE", "name", "id", "Authorization"]
)
payloads = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)


def reference(value: Any, patterns: tuple[str, ...]) -> Any:
    """The DESIGN.md rule, written independently of the implementation."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            name = key.lower().replace("-", "_")
            out[key] = REDACTED if any(p in name for p in patterns) else reference(inner, patterns)
        return out
    if isinstance(value, list):
        return [reference(v, patterns) for v in value]
    return value


def test_redact__top_level_and_nested_and_in_lists():
    payload = {
        "user": "ann",
        "Password": "hunter2",
        "auth": {"X-Api-Key": "k", "scheme": "basic", "refresh_token": {"deep": "x"}},
        "items": [{"client-secret": "s", "n": 1}, [{"Cookie": "c"}], "plain"],
    }

    assert redact(payload, PATTERNS) == {
        "user": "ann",
        "Password": REDACTED,
        "auth": {"X-Api-Key": REDACTED, "scheme": "basic", "refresh_token": REDACTED},
        "items": [{"client-secret": REDACTED, "n": 1}, [{"Cookie": REDACTED}], "plain"],
    }


def test_redact__substring_match_and_dash_read_as_underscore():
    patterns = normalise_patterns(["api_key", "Token"])

    assert is_secret_key("MY-API-KEY-2", patterns)
    assert is_secret_key("accessTOKENs", patterns)
    assert not is_secret_key("apikey", patterns)
    assert not is_secret_key("api key", patterns)
    assert not is_secret_key("tok", patterns)


def test_redact__pattern_with_dash_matches_underscore_key():
    patterns = normalise_patterns(["private-key"])

    assert redact({"ssh_private_key": "k", "PRIVATE-KEY": "k", "key": "v"}, patterns) == {
        "ssh_private_key": REDACTED, "PRIVATE-KEY": REDACTED, "key": "v",
    }


def test_redact__values_are_not_keys():
    assert redact({"note": "my password is x", "list": ["token"]}, PATTERNS) == {
        "note": "my password is x", "list": ["token"],
    }


def test_redact__scalars_pass_through():
    for value in (None, True, 3, 1.5, "password"):
        assert redact(value, PATTERNS) == value


def test_redact__tuples_become_lists():
    assert redact(({"secret": 1},), PATTERNS) == [{"secret": REDACTED}]


def test_normalise_patterns__lower_cases_and_drops_empty():
    assert normalise_patterns(["API-Key", "", "Secret"]) == ("api_key", "secret")


@settings(deadline=None)
@given(payload=payloads)
def test_redact__matches_rule_and_does_not_mutate_input(payload):
    before = copy.deepcopy(payload)

    result = redact(payload, PATTERNS)

    assert result == reference(payload, PATTERNS)
    assert payload == before


@settings(deadline=None)
@given(payload=payloads, patterns=st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_redact__any_patterns_match_rule(payload, patterns):
    normalised = normalise_patterns(patterns)

    assert redact(payload, normalised) == reference(payload, normalised)


@settings(deadline=None)
@given(payload=payloads)
def test_redact__no_secret_key_survives(payload):
    def secret_values(value: Any) -> list[Any]:
        found = []
        if isinstance(value, dict):
            for key, inner in value.items():
                if is_secret_key(key, PATTERNS):
                    found.append(inner)
                else:
                    found += secret_values(inner)
        elif isinstance(value, list):
            for inner in value:
                found += secret_values(inner)
        return found

    assert all(v == REDACTED for v in secret_values(redact(payload, PATTERNS)))
