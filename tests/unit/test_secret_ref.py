"""Unit tests of ``backplane.secrets``: the secret handle a producer puts in a payload instead of
a secret, its JSON form ``{"$secret_ref": uri}``, and how publishing carries it (never redacted,
never resolved)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backplane
from backplane import redaction
from backplane.conf import DEFAULTS
from backplane.events import build, encode
from backplane.secrets import MAX_REF_CHARS, REF_KEY, SecretRef, is_handle, is_ref

RULES = redaction.normalise_patterns(DEFAULTS["REDACT_PATTERNS"])  # type: ignore[arg-type]
TENANT = uuid.UUID("12345678-1234-5678-1234-567812345678")
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def stored(payload: Any) -> Any:
    """The payload as publish stores and peers receive it."""
    return json.loads(build(TENANT, {"type": "a.b", "payload": payload}, RULES, "id-1", NOW, 65536)[4])


@pytest.mark.parametrize(
    "uri",
    [
        "vault://kv/payments#api_key",
        "op://team/Stripe/credential",
        "aws-sm://eu-west-1/app/db?version=2",
        "k8s-secret://payments/stripe/key",
        "gcp-sm://projects/p/secrets/s/versions/3",
        "x://h/p@v2",
    ],
)
def test_secret_ref__accepts_uris(uri: str) -> None:
    ref = SecretRef(uri)

    assert ref.uri == uri and is_ref(uri)
    assert ref.as_json() == {REF_KEY: uri}
    assert SecretRef.from_json(ref.as_json()) == ref


@pytest.mark.parametrize(
    "value",
    [
        "hunter2",
        "sk_live_abcdef",
        "Bearer abc",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
        "vault://kv/a b",
        "vault://",
        "://kv/a",
        "vault:kv/a",
        "vault://user:pw@vault.example/kv/a",
        "vault://token@vault/kv",
        "",
        "vault://kv/" + "a" * MAX_REF_CHARS,
        42,
        None,
    ],
)
def test_secret_ref__refuses_what_is_not_a_handle_without_repeating_it(value: Any) -> None:
    with pytest.raises(ValueError) as raised:
        SecretRef(value)

    assert not is_ref(value)
    if value in ("hunter2", "sk_live_abcdef", "Bearer abc"):
        assert value not in str(raised.value)  # it may be the very secret a handle should replace


def test_secret_ref__immutable_hashable_and_comparable() -> None:
    ref = SecretRef("vault://kv/a#b")

    with pytest.raises(AttributeError):
        ref.uri = "vault://kv/c"  # type: ignore[misc]
    assert ref == SecretRef("vault://kv/a#b") and len({ref, SecretRef("vault://kv/a#b")}) == 1


@pytest.mark.parametrize(
    "value",
    [
        {REF_KEY: "hunter2"},
        {REF_KEY: "vault://kv/a", "x": 1},
        {"$secret": "vault://kv/a"},
        [REF_KEY, "vault://kv/a"],
        "vault://kv/a",
        None,
    ],
)
def test_from_json__not_a_handle(value: Any) -> None:
    assert SecretRef.from_json(value) is None
    assert not is_handle(value)


def test_publish__a_handle_is_stored_as_its_json_form_under_any_key() -> None:
    ref = SecretRef("vault://kv/payments#api_key")
    payload = {"api_key": ref, "config": {"password": ref, "plain": ref}, "headers": [["Authorization", ref]]}

    assert stored(payload) == {
        "api_key": {REF_KEY: ref.uri},
        "config": {"password": {REF_KEY: ref.uri}, "plain": {REF_KEY: ref.uri}},
        "headers": [["Authorization", {REF_KEY: ref.uri}]],
    }


def test_publish__a_handle_written_as_json_is_kept_and_a_fake_one_is_redacted() -> None:
    payload = {"token": {REF_KEY: "vault://kv/a"}, "secret": {REF_KEY: "hunter2"}}

    assert stored(payload) == {"token": {REF_KEY: "vault://kv/a"}, "secret": redaction.REDACTED}


def test_publish__a_handle_is_never_resolved() -> None:
    """The backplane has no resolver: what is stored is the handle, byte for byte."""
    assert encode({"k": SecretRef("vault://kv/a#b")}) == '{"k":{"$secret_ref":"vault://kv/a#b"}}'


def test_encode__other_objects_are_still_refused() -> None:
    from backplane import exceptions

    with pytest.raises(exceptions.InvalidPayload):
        encode({"k": object()})


def test_package__exports_secret_ref_lazily() -> None:
    assert backplane.SecretRef is SecretRef
    assert "SecretRef" in backplane.__all__


@settings(deadline=None)
@given(st.text(max_size=40))
def test_is_ref__every_accepted_handle_round_trips_and_is_no_credential(text: str) -> None:
    for uri in (text, f"vault://kv/{text}"):
        if is_ref(uri):
            assert SecretRef.from_json(json.loads(json.dumps(SecretRef(uri).as_json()))) == SecretRef(uri)
            assert not redaction.is_secret_value(uri)
            assert stored({"password": SecretRef(uri)}) == {"password": {REF_KEY: uri}}
