"""Unit tests of what needs no database in tokens and sessions: a command's token argument,
an operator principal's re-check key, and the check that warns when logout cannot end a socket."""

from __future__ import annotations

import io
import uuid

import pytest
from django.test import override_settings

from backplane import auth, exceptions, tokens
from backplane.checks import check_backplane_settings

TOKEN = tokens.TOKEN_PREFIX + "s3cret-value"


def test_token_argument__id_is_a_uuid():
    token_id = uuid.uuid4()

    assert tokens.token_argument(str(token_id), io.StringIO(TOKEN)) == token_id


def test_token_argument__dash_reads_one_line_of_stdin():
    assert tokens.token_argument("-", io.StringIO(f"  {TOKEN}\nignored\n")) == TOKEN


@pytest.mark.parametrize("stdin", ["", "\n", "   \n"])
def test_token_argument__empty_stdin_refused(stdin):
    with pytest.raises(exceptions.TokenError, match="standard input"):
        tokens.token_argument("-", io.StringIO(stdin))


@pytest.mark.parametrize("arg", [TOKEN, f" {TOKEN}"])
def test_token_argument__token_on_the_command_line_refused_without_echo(arg):
    with pytest.raises(exceptions.TokenError, match="looks like a token") as refused:
        tokens.token_argument(arg, io.StringIO(""))

    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("arg", ["dev-1", "", "12345"])
def test_token_argument__other_text_refused(arg):
    with pytest.raises(exceptions.TokenError, match="not a token id"):
        tokens.token_argument(arg, io.StringIO(""))


def test_principal__session_key_is_its_recheck_key_and_never_shown():
    tenant = uuid.uuid4()
    operator = auth.Principal(tenant, "operator-7", "operator", None, None, 7, "the-session-key")
    device = auth.Principal(tenant, "dev-1", "client", uuid.uuid4(), None)

    assert operator.recheck_key == (tenant, 7, "the-session-key")
    assert device.recheck_key == device.token_id
    assert "the-session-key" not in repr(operator) and "the-session-key" not in str(operator)


def test_checks__w020_signed_cookie_sessions_with_operator_origins():
    signed = "django.contrib.sessions.backends.signed_cookies"
    with override_settings(
        SECRET_KEY="a-real-secret", SESSION_ENGINE=signed, BACKPLANE={"ALLOWED_ORIGINS": ["https://o"]}
    ):
        assert [e.id for e in check_backplane_settings()] == ["backplane.W020"]
    with override_settings(SECRET_KEY="a-real-secret", SESSION_ENGINE=signed, BACKPLANE={"ALLOWED_ORIGINS": []}):
        assert check_backplane_settings() == []
    with override_settings(SECRET_KEY="a-real-secret", BACKPLANE={"ALLOWED_ORIGINS": ["https://o"]}):
        assert check_backplane_settings() == []
