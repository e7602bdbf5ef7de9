"""Unit tests of ``backplane.redaction`` against the rules of docs/redaction.md.

Keys are matched by words (split at separators, letter/digit changes and camelCase humps); a
pattern's words must appear consecutively as whole words, or run together, with a ``*`` at an
end letting that word run on. Pairs in lists and name/value objects are redacted by their name;
JWTs, bearer credentials and PEM private keys whatever their key. Secret handles stay. The
Hypothesis tests compare the implementation with the rules written out here independently.
"""

from __future__ import annotations

import copy
import string
from typing import Any

import pytest
from django.test import override_settings
from hypothesis import example, given, settings
from hypothesis import strategies as st

from backplane.checks import check_backplane_settings
from backplane.conf import DEFAULTS, conf
from backplane.redaction import REDACTED, Rules, is_secret_key, is_secret_value, normalise_patterns, redact, words
from backplane.secrets import REF_KEY, SecretRef, is_ref

RULES = normalise_patterns(DEFAULTS["REDACT_PATTERNS"])  # type: ignore[arg-type]
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1LTEifQ.c2lnbmF0dXJl"
PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n-----END OPENSSH PRIVATE KEY-----\n"
HANDLE = {REF_KEY: "vault://kv/payments#api_key"}


# --- the rules, written out independently ------------------------------------------------------


def reference_words(name: str) -> list[str]:
    """Words by walking characters: a boundary at non-alphanumerics, letter/digit changes, a
    lower-to-upper change, and before the last capital of a run followed by a lower-case letter."""
    out: list[str] = []
    current = ""
    for i, c in enumerate(name):
        if not (c.isascii() and c.isalnum()):
            out, current = (out + [current] if current else out), ""
            continue
        if current:
            p, nxt = current[-1], name[i + 1 : i + 2]
            if (
                p.isdigit() != c.isdigit()
                or (p.islower() and c.isupper())
                or (p.isupper() and c.isupper() and nxt.isascii() and nxt.islower())
            ):
                out, current = out + [current], ""
        current += c
    return [w.lower() for w in out + ([current] if current else [])]


def reference_is_secret_key(key: str, patterns: list[str]) -> bool:
    kw = reference_words(key)
    return any(_matches_somewhere(kw, p) for p in patterns)


def _matches_somewhere(kw: list[str], pattern: str) -> bool:
    lead, trail = pattern.startswith("*"), pattern.endswith("*")
    pw = reference_words(pattern.strip("*"))
    if not pw:
        return False
    return any(_covers(kw[i:j], pw, lead, trail, True) for i in range(len(kw)) for j in range(i + 1, len(kw) + 1))


def _covers(ks: list[str], pw: list[str], lead: bool, trail: bool, first: bool) -> bool:
    """The key words ``ks`` are the pattern words ``pw`` grouped (run together), the first key
    word allowed a prefix when ``lead``, the last a suffix when ``trail``."""
    if not ks or not pw:
        return not ks and not pw
    last = len(ks) == 1
    for m in range(1, len(pw) + 1):
        group, rest = "".join(pw[:m]), pw[m:]
        if last and rest:
            continue
        pre, suf = first and lead, last and trail
        fits = (
            group in ks[0]
            if pre and suf
            else ks[0].endswith(group)
            if pre
            else ks[0].startswith(group)
            if suf
            else ks[0] == group
        )
        if fits and _covers(ks[1:], rest, lead, trail, False):
            return True
    return False


B64URL = set(string.ascii_letters + string.digits + "-_")
B64TOKEN = set(string.ascii_letters + string.digits + "-._~+/")


def reference_is_secret_value(value: str) -> bool:
    s = value.strip(" \t\r\n")
    parts = s.split(".")
    if s.startswith("eyJ") and len(parts) in (3, 5) and all(set(p) <= B64URL for p in parts):
        return True
    if s[:6].lower() == "bearer" and s[6:7] in (" ", "\t"):
        token = s[6:].lstrip(" \t").rstrip("=")
        return bool(token) and set(token) <= B64TOKEN
    if s.startswith("-----BEGIN "):
        at = s.find("PRIVATE KEY-----", 11)
        return at >= 0 and set(s[11:at]) <= set(string.ascii_uppercase + string.digits + " ")
    return False


def reference_is_handle(value: Any) -> bool:
    return isinstance(value, SecretRef) or (
        isinstance(value, dict) and list(value) == [REF_KEY] and is_ref(value[REF_KEY])
    )


def reference(value: Any, patterns: list[str]) -> Any:
    def secret(name: Any) -> bool:
        return isinstance(name, str) and reference_is_secret_key(name, patterns)

    if isinstance(value, str):
        return REDACTED if reference_is_secret_value(value) else value
    if reference_is_handle(value):
        return value
    if isinstance(value, dict):
        out = {
            k: (v if reference_is_handle(v) else REDACTED) if secret(k) else reference(v, patterns)
            for k, v in value.items()
        }
        for slot, names in (("value", ("name", "key")), ("Value", ("Name", "Key"))):
            if slot in value:
                name = value.get(names[0], value.get(names[1]))
                if secret(name) and not reference_is_handle(value[slot]):
                    out[slot] = REDACTED
                break
        return out
    if isinstance(value, list | tuple):
        return [
            (v if reference_is_handle(v[1]) else [v[0], REDACTED])
            if isinstance(v, list | tuple) and len(v) == 2 and secret(v[0])
            else reference(v, patterns)
            for v in value
        ]
    return value


# --- strategies -------------------------------------------------------------------------------

fragments = st.sampled_from(
    [
        "pass",
        "word",
        "password",
        "Password",
        "PASSWORD",
        "pwd",
        "pin",
        "PIN",
        "ship",
        "ping",
        "auth",
        "author",
        "oauth",
        "token",
        "Tokens",
        "access",
        "api",
        "Key",
        "API",
        "session",
        "Id",
        "ID",
        "secret",
        "ary",
        "otp",
        "totp",
        "jwt",
        "bearer",
        "cookie",
        "sig",
        "signature",
        "private",
        "x",
        "2",
        "42",
        "s",
        "name",
        "value",
    ]
)
separators = st.sampled_from(["", "", "_", "-", ".", " ", "$"])
keys = st.one_of(
    st.text(max_size=12),
    st.lists(st.tuples(fragments, separators), min_size=1, max_size=4).map(
        lambda parts: "".join(a + b for a, b in parts)
    ),
)
b64 = st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=12)
secret_values = st.one_of(
    st.tuples(b64, b64, b64).map(lambda p: f"eyJ{p[0]}.{p[1]}.{p[2]}"),
    st.tuples(
        st.sampled_from(["Bearer", "bearer", "BEARER"]),
        st.sampled_from([" ", "\t", "  "]),
        st.text(alphabet=string.ascii_letters + "._~+/=-", min_size=1, max_size=12),
    ).map("".join),
    st.sampled_from(
        [
            PEM,
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN PUBLIC KEY-----x",
            "Bearer of bad news",
            "eyJ",
            " " + JWT + "\n",
            "bearer",
            "Bearer ",
            "\x0c" + JWT,
            JWT + "\x0c",
        ]
    ),
)
handles = st.one_of(
    st.just(HANDLE),
    st.sampled_from(["vault://kv/a#b", "op://team/item/field", "bad uri", "x://u:p@host/k"]).map(
        lambda u: {REF_KEY: u}
    ),
    st.just(SecretRef("aws-sm://eu-west-1/app/db")),
    st.just({REF_KEY: "vault://kv/a", "also": 1}),
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10) | secret_values
payloads = st.recursive(
    scalars | handles,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.tuples(keys, children).map(list),  # a [name, value] pair
        st.fixed_dictionaries({"name": keys, "value": children}),
        st.fixed_dictionaries({"Key": keys, "Value": children, "Name": keys}),
    ),
    max_leaves=20,
)


# --- key names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "DB_PASSWORD",
        "dbpassword",
        "newPassword",
        "passwords",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "client_secret",
        "clientSecret",
        "secrets",
        "token",
        "access_token",
        "accessToken",
        "accesstoken",
        "X-Auth-Token",
        "api_key",
        "apikey",
        "apiKey",
        "X-API-Key",
        "MY-API-KEY-2",
        "Authorization",
        "Proxy-Authorization",
        "auth",
        "authHeader",
        "x-auth",
        "bearer",
        "jwt",
        "id_jwt",
        "cookie",
        "Set-Cookie",
        "setcookie",
        "cookies",
        "credential",
        "credentials",
        "aws_credential",
        "private_key",
        "privateKey",
        "ssh-private-key",
        "session",
        "session_id",
        "sessionId",
        "sessionid",
        "SESSION_COOKIE",
        "signature",
        "X-Hub-Signature-256",
        "pin",
        "PIN",
        "pin_code",
        "pinCode",
        "otp",
        "totp",
        "otp_code",
    ],
)
def test_is_secret_key__default_patterns_cover(key: str) -> None:
    assert RULES.is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "shipping",
        "spin",
        "pinned",
        "pinnacle",
        "author",
        "authority",
        "oauth",
        "secretary",
        "tokenizer",
        "max_tokens",
        "prompt_tokens",
        "passwordless",
        "api",
        "key",
        "keys",
        "sessions",
        "name",
        "value",
        "id",
        "description",
        "cwd",
        "sign",
        "opinion",
        "jwtish",
        "cookiejar",
        "bear",
    ],
)
def test_is_secret_key__defaults_leave_words_that_only_contain_a_pattern(key: str) -> None:
    assert not RULES.is_secret_key(key)


def test_words__separators_digits_and_camel_case() -> None:
    assert words("X-API-Key") == ["x", "api", "key"]
    assert words("refreshToken2") == ["refresh", "token", "2"]
    assert words("HTTPServer.sessionID") == ["http", "server", "session", "id"]
    assert words("--") == []


def test_normalise_patterns__words_joined_stars_kept_wordless_and_repeats_dropped() -> None:
    assert normalise_patterns(["API-Key", "", "*", "Secret", "*refreshToken*", "api_key"]) == (
        "api_key",
        "secret",
        "*refresh_token*",
    )
    assert isinstance(normalise_patterns([]), Rules)


def test_is_secret_key__stars_and_run_together_words() -> None:
    rules = normalise_patterns(["*token", "pin*", "api_key"])

    assert rules.is_secret_key("csrftoken") and not rules.is_secret_key("tokens")
    assert rules.is_secret_key("pins") and not rules.is_secret_key("spin")
    assert rules.is_secret_key("APIKEY") and rules.is_secret_key("x_apiKey") and not rules.is_secret_key("ap_ikey")


def test_is_secret_key__plain_tuples_are_compiled() -> None:
    assert is_secret_key("user_password", ("password",))
    assert redact({"pin": 1}, ("pin",)) == {"pin": REDACTED}


def test_is_secret_key__no_patterns_no_secret_keys() -> None:
    assert not normalise_patterns([]).is_secret_key("password")


@settings(deadline=None, max_examples=300)
@given(key=keys)
def test_is_secret_key__matches_the_rule_for_the_defaults(key: str) -> None:
    assert RULES.is_secret_key(key) == reference_is_secret_key(key, list(RULES))
    assert words(key) == reference_words(key)


@settings(deadline=None, max_examples=300)
@given(
    key=keys,
    patterns=st.lists(st.tuples(st.sampled_from(["", "*"]), keys, st.sampled_from(["", "*"])).map("".join), max_size=3),
)
def test_is_secret_key__matches_the_rule_for_any_patterns(key: str, patterns: list[str]) -> None:
    rules = normalise_patterns(patterns)

    assert rules.is_secret_key(key) == reference_is_secret_key(key, list(rules))


# --- values and shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        JWT,
        f" {JWT}\n",
        JWT + ".aXY.Y3Q",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.",
        "Bearer abc.DEF-123~+/==",
        "bearer\tx",
        "BEARER   " + JWT,
        PEM,
        "-----BEGIN RSA PRIVATE KEY-----\n…",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----",
    ],
)
def test_is_secret_value__credentials_whatever_their_key(value: str) -> None:
    assert is_secret_value(value)
    assert redact({"note": value, "list": [value]}, RULES) == {"note": REDACTED, "list": [REDACTED]}
    assert redact(value, RULES) == REDACTED


@pytest.mark.parametrize(
    "value",
    [
        "Bearer of bad news",
        "Bearer",
        "Bearer ",
        "bearer:abc",
        "eyJ",
        "eyJ.x",
        "eyJa.b.c.d",
        "eyJa.b!.c",
        "eye.drops.now",
        "-----BEGIN PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----",
        "edge-a",
        "",
        "a JWT: " + JWT,
    ],
)
def test_is_secret_value__not_credentials(value: str) -> None:
    assert not is_secret_value(value)


def test_redact__header_lists_and_name_value_objects() -> None:
    payload = {
        "headers": [["Authorization", "Basic dTpw"], ["Accept", "application/json"], ("X-Api-Key", "k")],
        "env": [{"name": "DB_PASSWORD", "value": "p"}, {"name": "HOME", "value": "/root"}],
        "tags": [{"Key": "session_token", "Value": "t"}, {"key": "region", "value": "eu"}],
        "pair": ["token", "not a header list"],  # a pair only counts inside a list
    }

    assert redact(payload, RULES) == {
        "headers": [["Authorization", REDACTED], ["Accept", "application/json"], ["X-Api-Key", REDACTED]],
        "env": [{"name": "DB_PASSWORD", "value": REDACTED}, {"name": "HOME", "value": "/root"}],
        "tags": [{"Key": "session_token", "Value": REDACTED}, {"key": "region", "value": "eu"}],
        "pair": ["token", "not a header list"],
    }


def test_redact__top_level_nested_and_in_lists() -> None:
    payload = {
        "user": "ann",
        "Password": "hunter2",
        "config": {"X-Api-Key": "k", "scheme": "basic", "refresh_token": {"deep": "x"}},
        "items": [{"client-secret": "s", "n": 1}, [{"Cookie": "c"}], "plain"],
        "auth": {"method": "oidc"},
    }

    assert redact(payload, RULES) == {
        "user": "ann",
        "Password": REDACTED,
        "config": {"X-Api-Key": REDACTED, "scheme": "basic", "refresh_token": REDACTED},
        "items": [{"client-secret": REDACTED, "n": 1}, [{"Cookie": REDACTED}], "plain"],
        "auth": REDACTED,
    }


def test_redact__handles_stay_under_secret_keys_in_pairs_and_name_value_objects() -> None:
    ref = SecretRef("vault://kv/payments#api_key")
    payload = {
        "api_key": HANDLE,
        "token": ref,
        "headers": [["Authorization", HANDLE]],
        "env": [{"name": "DB_PASSWORD", "value": HANDLE}],
        "plain": HANDLE,
    }

    assert redact(payload, RULES) is payload


@pytest.mark.parametrize(
    "fake",
    [
        {REF_KEY: "hunter2"},
        {REF_KEY: "Bearer abc"},
        {REF_KEY: "vault://user:pw@vault/kv"},
        {REF_KEY: "vault://kv/a", "value": "x"},
        {REF_KEY: ["vault://kv/a"]},
    ],
)
def test_redact__what_is_not_a_handle_is_redacted_like_anything_else(fake: dict[str, Any]) -> None:
    assert redact({"api_key": fake}, RULES) == {"api_key": REDACTED}
    assert redact({"ok": fake}, RULES)["ok"][REF_KEY] == REDACTED  # "$secret_ref" names a secret


def test_redact__nothing_to_redact_returns_the_same_object() -> None:
    payload = {"n": 1, "pad": "x" * 64, "run": {"id": "r1", "steps": [1, 2, ["a", "b"]]}}

    assert redact(payload, RULES) is payload


def test_redact__scalars_pass_through_and_tuples_become_lists() -> None:
    for value in (None, True, 3, 1.5, "password"):
        assert redact(value, RULES) == value
    assert redact(({"secret": 1},), RULES) == [{"secret": REDACTED}]


@settings(deadline=None, max_examples=300)
@given(payload=payloads)
def test_redact__matches_the_rules_and_does_not_change_its_input(payload: Any) -> None:
    before = copy.deepcopy(payload)

    result = redact(payload, RULES)

    assert result == reference(payload, list(RULES))
    assert payload == before
    assert redact(result, RULES) == result  # idempotent


@settings(deadline=None, max_examples=200)
@given(payload=payloads, patterns=st.lists(keys, max_size=3))
def test_redact__matches_the_rules_for_any_patterns(payload: Any, patterns: list[str]) -> None:
    rules = normalise_patterns(patterns)

    assert redact(payload, rules) == reference(payload, list(rules))


@settings(deadline=None, max_examples=300)
@given(payload=payloads)
@example(payload={"Key": "Bearer"})  # a secret-looking name with no value beside it: nothing to hide
def test_redact__no_secret_survives(payload: Any) -> None:
    """Checked on the output alone: every secret-looking place holds REDACTED or a handle."""

    def hidden(v: Any) -> bool:
        return v == REDACTED or reference_is_handle(v)

    def check(v: Any) -> None:
        if isinstance(v, str):
            assert not reference_is_secret_value(v)
        elif reference_is_handle(v):
            return
        elif isinstance(v, dict):
            for k, inner in v.items():
                if isinstance(k, str) and reference_is_secret_key(k, list(RULES)):
                    assert hidden(inner), k
                else:
                    check(inner)
            name = v.get("name", v.get("key")) if "value" in v else v.get("Name", v.get("Key"))
            # A name/value pair with a secret name hides its value (a pair with no value has none).
            value_key = "value" if "value" in v else "Value"
            if isinstance(name, str) and reference_is_secret_key(name, list(RULES)) and value_key in v:
                assert hidden(v[value_key])
        elif isinstance(v, list):
            for inner in v:
                if (
                    isinstance(inner, list)
                    and len(inner) == 2
                    and isinstance(inner[0], str)
                    and reference_is_secret_key(inner[0], list(RULES))
                ):
                    assert hidden(inner[1])
                else:
                    check(inner)

    check(redact(payload, RULES))


def test_rules__remember_a_bounded_number_of_keys() -> None:
    rules = normalise_patterns(["token"])
    for n in range(5000):
        rules.is_secret_key(f"k{n}")

    assert len(rules._seen) <= 4096
    assert rules.is_secret_key("token") and not rules.is_secret_key("k1")


# --- settings ---------------------------------------------------------------------------------


def ids(**overrides: object) -> list[str]:
    with override_settings(SECRET_KEY="a-real-secret", **overrides):
        return [m.id for m in check_backplane_settings()]


def test_conf__extra_patterns_add_to_the_defaults() -> None:
    with override_settings(BACKPLANE={"REDACT_PATTERNS_EXTRA": ["ssn", "card_number"]}):
        assert list(conf.REDACT_PATTERNS) == [*DEFAULTS["REDACT_PATTERNS"], "ssn", "card_number"]  # type: ignore[misc]
        rules = normalise_patterns(conf.REDACT_PATTERNS)
    assert redact({"ssn": 1, "cardNumber": 2, "password": 3, "n": 4}, rules) == {
        "ssn": REDACTED,
        "cardNumber": REDACTED,
        "password": REDACTED,
        "n": 4,
    }


def test_conf__extra_patterns_from_the_environment_may_be_comma_separated() -> None:
    with override_settings(BACKPLANE={"REDACT_PATTERNS_EXTRA": " ssn, card_number ,"}):
        assert list(conf.REDACT_PATTERNS)[-2:] == ["ssn", "card_number"]


def test_conf__redact_patterns_replaces_the_defaults_and_extra_adds_to_it() -> None:
    with override_settings(BACKPLANE={"REDACT_PATTERNS": ["pin"], "REDACT_PATTERNS_EXTRA": ["ssn"]}):
        assert list(conf.REDACT_PATTERNS) == ["pin", "ssn"]
    with override_settings(BACKPLANE={}):
        assert conf.REDACT_PATTERNS is DEFAULTS["REDACT_PATTERNS"]  # nothing built on the hot path


@pytest.mark.parametrize("value", [["ssn", ""], [None], 3, {"ssn": 1}])
def test_checks__e040_extra_patterns(value: object) -> None:
    assert ids(BACKPLANE={"REDACT_PATTERNS_EXTRA": value}) == ["backplane.E040"]


def test_checks__e040_accepts_a_list_or_a_comma_separated_string() -> None:
    assert ids(BACKPLANE={"REDACT_PATTERNS_EXTRA": ["ssn"]}) == []
    assert ids(BACKPLANE={"REDACT_PATTERNS_EXTRA": "ssn,card_number"}) == []


@pytest.mark.parametrize(
    "settings_",
    [{"REDACT_PATTERNS_EXTRA": ["*"]}, {"REDACT_PATTERNS_EXTRA": ["--"]}, {"REDACT_PATTERNS_EXTRA": ["api*key"]}],
)
def test_checks__e041_a_pattern_naming_no_word(settings_: dict[str, object]) -> None:
    assert ids(BACKPLANE=settings_) == ["backplane.E041"]


def test_checks__w040_replacing_the_defaults_is_flagged() -> None:
    assert ids(BACKPLANE={"REDACT_PATTERNS": ["pin"]}) == ["backplane.W040"]
    assert ids(BACKPLANE={"REDACT_PATTERNS": [*DEFAULTS["REDACT_PATTERNS"], "ssn"]}) == []  # type: ignore[misc]
    assert ids(BACKPLANE={"REDACT_PATTERNS": "pin"}) == ["backplane.E006"]  # malformed: E006 alone
