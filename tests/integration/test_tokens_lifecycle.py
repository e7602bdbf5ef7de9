"""Tokens and sessions (issue 13, point 5), on real rows: default lifetimes, rotation,
revocation by id or standard input, the audit of each event, and the heartbeat's re-check of
operator sessions.

Each test was run against the code before this change and failed there (no audit table, no
default lifetime, a token accepted on the command line, sessions not re-checked).
"""

from __future__ import annotations

import io
import logging
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backplane import auth, tokens
from backplane.models import AccessToken, Connection, Edge, OperatorAccess, OutboxItem, TokenAudit
from backplane.protocol import Close

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

OPS = "http://ops.example"


def run(*args: str, stdin: str | None = None) -> list[str]:
    out = io.StringIO()
    kwargs = {"stdin": io.StringIO(stdin)} if stdin is not None else {}
    call_command(*args, stdout=out, **kwargs)
    return out.getvalue().splitlines()


def bearer(token: str) -> dict:
    return {"headers": [(b"authorization", f"Bearer {token}".encode())], "subprotocols": ["tyrum-v1"]}


def audits(**filters) -> list[tuple[str, str, uuid.UUID]]:
    return list(TokenAudit.objects.filter(**filters).order_by("id").values_list("action", "actor", "token_id"))


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


def assert_no_secret_in_audit(token: str) -> None:
    text = repr(list(TokenAudit.objects.values()))
    assert token not in text and auth.hash_token(token) not in text


# --- lifetimes ------------------------------------------------------------------------------


def test_create_token__expires_after_the_configured_lifetime_by_default(tenant):
    before = timezone.now()
    with override_settings(BACKPLANE={"TOKEN_LIFETIME_SECS": 3600}):
        row, _ = tokens.create_token(tenant, "d-1", "client")
    never, _ = tokens.create_token(tenant, "d-2", "client", expires_at=None)

    assert before + timedelta(hours=1) <= row.expires_at <= timezone.now() + timedelta(hours=1)
    assert never.expires_at is None


def test_create_token_command__lifetime_default_expires_in_or_no_expiry(tenant):
    default = run("create_token", "--tenant", "acme", "--device", "d-1", "--role", "client")
    short = run("create_token", "--tenant", "acme", "--device", "d-2", "--role", "client", "--expires-in", "60")
    never = run("create_token", "--tenant", "acme", "--device", "d-3", "--role", "client", "--no-expiry")

    rows = {r.device_id: r for r in AccessToken.objects.all()}
    lifetime = rows["d-1"].expires_at - rows["d-1"].created_at
    assert abs(lifetime.total_seconds() - 90 * 24 * 3600) < 60
    assert abs((rows["d-2"].expires_at - rows["d-2"].created_at).total_seconds() - 60) < 5
    assert rows["d-3"].expires_at is None
    assert "expires" in default[-2] and "never expires" in never[-2] and "expires" in short[-2]


@pytest.mark.parametrize("args", [["--expires-in", "60", "--no-expiry"], ["--expires-in", "0"], ["--expires-in", "-5"]])
def test_create_token_command__contradictory_or_empty_lifetime_refused(tenant, args):
    with pytest.raises(CommandError):
        run("create_token", "--tenant", "acme", "--device", "d-1", "--role", "client", *args)
    assert not AccessToken.objects.exists()


# --- the audit ------------------------------------------------------------------------------


def test_audit__create_and_revoke_by_command_recorded_and_logged_without_the_token(tenant, caplog):
    caplog.set_level(logging.INFO, logger="backplane.auth")

    token = run("create_token", "--tenant", "acme", "--device", "d-1", "--role", "client")[-1]
    row = AccessToken.objects.get()
    run("revoke_token", str(row.id))
    run("revoke_token", str(row.id))  # again: tells the edges again, not a second revocation

    assert audits() == [("create", "cli", row.id), ("revoke", "cli", row.id)]
    record = TokenAudit.objects.get(action="revoke")
    assert (record.tenant_id, record.device_id) == (tenant.id, "d-1")
    assert_no_secret_in_audit(token)
    logged = [r for r in caplog.records if getattr(r, "action", None) == "token_audit"]
    assert [(r.token_action, r.token_id, r.actor) for r in logged] == [
        ("create", str(row.id), "cli"),
        ("revoke", str(row.id), "cli"),
    ]
    assert token not in caplog.text and auth.hash_token(token) not in caplog.text


def test_audit__nothing_recorded_when_creation_fails(tenant):
    with pytest.raises(CommandError):
        run("create_token", "--tenant", "acme", "--device", "bad id", "--role", "client")

    assert audits() == []


def test_audit__expiry_recorded_once_when_refused_and_rechecked(tenant, caplog):
    caplog.set_level(logging.INFO, logger="backplane.auth")
    row, token = tokens.create_token(tenant, "d-1", "client", expires_at=timezone.now() - timedelta(seconds=1))
    live, _ = tokens.create_token(tenant, "d-2", "client")

    with pytest.raises(auth.AuthRefused, match="expired"):
        auth.authenticate(bearer(token))
    assert audits(action="expire") == [("expire", "system", row.id)]  # refused: recorded
    TokenAudit.objects.filter(action="expire").delete()
    assert auth.recheck({row.id, live.id}, set()) == {row.id: Close.TOKEN_EXPIRED}
    assert audits(action="expire") == [("expire", "system", row.id)]  # closed: recorded
    for _ in range(2):
        with pytest.raises(auth.AuthRefused, match="expired"):
            auth.authenticate(bearer(token))
        assert auth.recheck({row.id, live.id}, set()) == {row.id: Close.TOKEN_EXPIRED}

    assert audits(action="expire") == [("expire", "system", row.id)]  # once
    logged = [r.token_id for r in caplog.records if getattr(r, "token_action", None) == "expire"]
    assert logged == [str(row.id)] * 2  # the first refusal, the first close after the record was gone


# --- rotation -------------------------------------------------------------------------------


def test_rotate_token__new_token_same_device_old_valid_for_the_grace(tenant):
    old, old_token = tokens.create_token(tenant, "d-1", "node", label="rack 4", expires_at=None)

    _, new, new_token = tokens.rotate_token(old.id, grace_secs=600, actor="cli")

    assert (new.tenant_id, new.device_id, new.role, new.label) == (tenant.id, "d-1", "node", "rack 4")
    assert new.id != old.id and new_token != old_token
    assert auth.authenticate(bearer(new_token)).token_id == new.id
    assert auth.authenticate(bearer(old_token)).token_id == old.id  # within the grace
    old.refresh_from_db()
    assert timezone.now() < old.expires_at <= timezone.now() + timedelta(seconds=600)
    assert new.expires_at is not None  # the default lifetime
    assert audits() == [("create", "system", old.id), ("rotate", "cli", old.id), ("create", "cli", new.id)]
    assert_no_secret_in_audit(old_token)
    assert_no_secret_in_audit(new_token)


def test_rotate_token__never_lengthens_the_old_token(tenant):
    soon = timezone.now() + timedelta(seconds=60)
    old, _ = tokens.create_token(tenant, "d-1", "client", expires_at=soon)

    tokens.rotate_token(old.id, grace_secs=86400)

    old.refresh_from_db()
    assert old.expires_at == soon


def test_rotate_token__revoked_token_not_rotated(tenant):
    old, _ = tokens.create_token(tenant, "d-1", "client")
    tokens.revoke_token(old.id)

    with pytest.raises(auth.exceptions.TokenError, match="revoked"):
        tokens.rotate_token(old.id)
    assert AccessToken.objects.count() == 1


def test_rotate_token_command__by_id_or_stdin_prints_the_new_token_last(tenant):
    old, old_token = tokens.create_token(tenant, "d-1", "client")

    by_id = run("rotate_token", str(old.id), "--grace", "0")
    by_stdin = run("rotate_token", "-", stdin=by_id[-1] + "\n")

    first = AccessToken.objects.get(token_hash=auth.hash_token(by_id[-1]))
    second = AccessToken.objects.get(token_hash=auth.hash_token(by_stdin[-1]))
    assert first.device_id == second.device_id == "d-1"
    with pytest.raises(auth.AuthRefused, match="expired"):  # no grace asked for
        auth.authenticate(bearer(old_token))
    assert auth.authenticate(bearer(by_id[-1])).token_id == first.id  # the default grace
    assert old_token not in "\n".join(by_id + by_stdin)


# --- revoke_token takes no token on its command line ----------------------------------------


def test_revoke_token_command__token_argument_refused_and_not_echoed(tenant):
    row, token = tokens.create_token(tenant, "d-1", "client")

    for command in ("revoke_token", "rotate_token"):
        with pytest.raises(CommandError, match="looks like a token") as refused:
            run(command, token)
        assert token not in str(refused.value)
        with pytest.raises(CommandError, match="not a token id"):
            run(command, "d-1")
    assert AccessToken.objects.get().revoked_at is None
    assert AccessToken.objects.count() == 1


def test_revoke_token_command__reads_the_token_from_stdin(tenant):
    Edge.objects.create(edge_id="edge-1")
    row, token = tokens.create_token(tenant, "d-1", "client")
    Connection.objects.create(
        connection_id="c-1",
        tenant=tenant,
        device_id="d-1",
        role="client",
        token=row,
        edge_id="edge-1",
        channel_name="x",
        expires_at=timezone.now() + timedelta(minutes=1),
    )

    lines = run("revoke_token", "-", stdin=token + "\n")

    assert lines == [f"revoked token {row.id}; told 1 edge(s)"]
    assert OutboxItem.objects.get(kind="command").payload["token_id"] == str(row.id)
    with pytest.raises(CommandError, match="standard input"):
        run("revoke_token", "-", stdin="")


# --- the heartbeat's re-check of operator sessions ------------------------------------------


@pytest.fixture
def operator(tenant):
    user = get_user_model().objects.create_user("ops", is_staff=True)  # no password: hashing is slow
    OperatorAccess.objects.create(user=user, tenant=tenant)
    return user


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
def session_principal(user) -> tuple[Client, auth.Principal]:
    client = Client()
    client.force_login(user)
    key = client.cookies[settings.SESSION_COOKIE_NAME].value
    scope = {"headers": [(b"cookie", f"{settings.SESSION_COOKIE_NAME}={key}".encode()), (b"origin", OPS.encode())]}
    return client, auth.authenticate(scope)


def recheck(*principals: auth.Principal) -> list[Close | None]:
    bad = auth.recheck(set(), {p.recheck_key for p in principals})
    return [bad.get(p.recheck_key) for p in principals]


def test_recheck__live_sessions_hold(operator):
    _, one = session_principal(operator)
    _, two = session_principal(operator)

    assert recheck(one, two) == [None, None]
    assert one.session_key not in repr(one)


def test_recheck__logout_closes_that_session_only(operator):
    client, gone = session_principal(operator)
    _, kept = session_principal(operator)

    client.logout()

    assert recheck(gone, kept) == [Close.POLICY, None]


def test_recheck__password_change_closes_every_session(operator):
    _, one = session_principal(operator)
    _, two = session_principal(operator)

    operator.set_password("changed")
    operator.save()

    assert recheck(one, two) == [Close.POLICY, Close.POLICY]


def test_recheck__expired_session_closes_with_4401(operator):
    _, expired = session_principal(operator)
    _, kept = session_principal(operator)

    Session.objects.filter(session_key=expired.session_key).update(expire_date=timezone.now() - timedelta(seconds=1))

    assert recheck(expired, kept) == [Close.TOKEN_EXPIRED, None]


def test_recheck__deactivated_user_or_lost_access_closes(operator, tenant):
    _, principal = session_principal(operator)
    OperatorAccess.objects.filter(user=operator).delete()
    assert recheck(principal) == [Close.POLICY]

    OperatorAccess.objects.create(user=operator, tenant=tenant)
    assert recheck(principal) == [None]
    get_user_model().objects.filter(pk=operator.pk).update(is_active=False)
    assert recheck(principal) == [Close.POLICY]


def test_recheck__one_query_per_kind_of_credential(tenant, operator):
    token_ids = [tokens.create_token(tenant, f"d-{n}", "client")[0].id for n in range(5)]
    principals = [session_principal(operator)[1] for _ in range(3)]

    with CaptureQueriesContext(connection) as queries:
        auth.recheck(set(token_ids), {p.recheck_key for p in principals})

    # Tokens, operator access (with the users), sessions: three, however many sockets.
    assert len(queries) == 3, [q["sql"] for q in queries]
