"""Unit tests of the pure parts of ``backplane.auth``: URL credentials, the auth subprotocol, hashing."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backplane import auth, protocol

CREDENTIAL_NAMES = ["token", "access_token", "auth", "authorization", "api_key", "jwt"]


def unpadded(token: str) -> str:
    return base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


# --- url_has_credential -----------------------------------------------------------------


@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
@pytest.mark.parametrize("spell", [str.lower, str.upper, str.title])
def test_url_has_credential__protocol_names_any_case(name, spell):
    assert auth.url_has_credential(f"{spell(name)}=abc".encode())
    assert auth.url_has_credential(f"tenant=acme&{spell(name)}=abc&x=1".encode())


@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
def test_url_has_credential__blank_or_valueless_still_refused(name):
    assert auth.url_has_credential(f"{name}=".encode())
    assert auth.url_has_credential(name.encode())


def test_url_has_credential__percent_encoded_name_refused():
    assert auth.url_has_credential(b"%74oken=abc")
    assert auth.url_has_credential(b"ACCESS%5FTOKEN=abc")


@pytest.mark.parametrize("query", [b"", b"tenant=acme", b"tokens=1", b"my_token=1", b"x=token", b"authz=1"])
def test_url_has_credential__other_parameters_pass(query):
    assert not auth.url_has_credential(query)


@settings(deadline=None)
@given(params=st.lists(st.tuples(st.text(min_size=1), st.text()), max_size=5))
def test_url_has_credential__exactly_when_a_credential_name_is_present(params):
    query = urlencode(params).encode()

    expected = any(name.lower() in CREDENTIAL_NAMES for name, _ in params)
    assert auth.url_has_credential(query) == expected


# --- subprotocol_token ------------------------------------------------------------------


@settings(deadline=None)
@given(token=st.text(min_size=1))
def test_subprotocol_token__decodes_unpadded_base64url(token):
    proto = protocol.AUTH_SUBPROTOCOL_PREFIX + unpadded(token)
    assert "=" not in proto

    assert auth.subprotocol_token(["tyrum-v1", proto]) == token


def test_subprotocol_token__url_safe_alphabet():
    token = "\xff\xfe?>"  # encodes to '-' and '_' in base64url
    encoded = unpadded(token)
    assert "-" in encoded or "_" in encoded

    assert auth.subprotocol_token([f"tyrum-auth.{encoded}"]) == token


def test_subprotocol_token__absent_is_none():
    assert auth.subprotocol_token([]) is None
    assert auth.subprotocol_token(["tyrum-v1", "other"]) is None


@pytest.mark.parametrize("encoded", ["a", "abcde", base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("=")])
def test_subprotocol_token__malformed_is_refused(encoded):
    with pytest.raises(auth.AuthRefused):
        auth.subprotocol_token(["tyrum-v1", f"tyrum-auth.{encoded}"])


# --- hash_token -------------------------------------------------------------------------


def test_hash_token__sha256_hex_without_the_token():
    token = "tyr_" + "x" * 43

    digest = auth.hash_token(token)

    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert token not in digest


@settings(deadline=None)
@given(a=st.text(), b=st.text())
def test_hash_token__stable_and_distinct(a, b):
    assert auth.hash_token(a) == auth.hash_token(a)
    if a != b:
        assert auth.hash_token(a) != auth.hash_token(b)
