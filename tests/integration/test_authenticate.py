"""``auth.authenticate`` on real rows: Bearer, the auth subprotocol, and an operator's session cookie."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.utils import timezone

from backplane import auth, tokens
from backplane.models import AccessToken, OperatorAccess

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

OPS = "http://ops.example"


def bearer(token: str, **extra) -> dict:
    return {"headers": [(b"authorization", f"Bearer {token}".encode())], "subprotocols": ["tyrum-v1"], **extra}


def via_subprotocol(token: str) -> dict:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    return {"headers": [], "subprotocols": ["tyrum-v1", f"tyrum-auth.{encoded}"]}


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


def test_authenticate__bearer_gives_principal(tenant, token_factory):
    token = token_factory(tenant, "dev-1", "node")
    row = AccessToken.objects.get(token_hash=auth.hash_token(token))

    principal = auth.authenticate(bearer(token))

    assert principal == auth.Principal(tenant.id, "dev-1", "node", row.id, row.expires_at)


def test_authenticate__bearer_scheme_any_case(tenant, token_factory):
    token = token_factory(tenant)

    scope = {"headers": [(b"Authorization", f"bEaReR {token}".encode())]}

    assert auth.authenticate(scope).device_id == "dev-1"


@pytest.mark.parametrize("value", [b"Basic dXNlcjpwdw==", b"Bearer", b"Bearer   ", b"Token abc"])
def test_authenticate__other_authorization_refused(tenant, token_factory, value):
    token_factory(tenant)

    with pytest.raises(auth.AuthRefused):
        auth.authenticate({"headers": [(b"authorization", value)]})


def test_authenticate__subprotocol_gives_principal(tenant, token_factory):
    token = token_factory(tenant, "browser-1", "operator")

    principal = auth.authenticate(via_subprotocol(token))

    assert (principal.tenant_id, principal.device_id, principal.role) == (tenant.id, "browser-1", "operator")


def test_authenticate__bearer_takes_precedence_over_subprotocol(tenant, token_factory):
    header_token = token_factory(tenant, "by-header")
    proto_token = token_factory(tenant, "by-proto")
    scope = via_subprotocol(proto_token)
    scope["headers"] = bearer(header_token)["headers"]

    assert auth.authenticate(scope).device_id == "by-header"
    scope["headers"] = bearer("tyr_unknown")["headers"]
    with pytest.raises(auth.AuthRefused):
        auth.authenticate(scope)


def test_authenticate__no_credential_refused(tenant):
    with pytest.raises(auth.AuthRefused):
        auth.authenticate({"headers": [], "subprotocols": ["tyrum-v1"]})


@pytest.mark.parametrize("make_scope", [bearer, via_subprotocol])
def test_authenticate__unknown_token_refused(tenant, token_factory, make_scope):
    token = token_factory(tenant)

    with pytest.raises(auth.AuthRefused, match="unknown"):
        auth.authenticate(make_scope(token + "x"))


@pytest.mark.parametrize("make_scope", [bearer, via_subprotocol])
def test_authenticate__revoked_token_refused(tenant, token_factory, make_scope):
    token = token_factory(tenant)
    tokens.revoke_token(token)

    with pytest.raises(auth.AuthRefused, match="revoked"):
        auth.authenticate(make_scope(token))


def test_authenticate__expired_token_refused(tenant, token_factory):
    soon = token_factory(tenant, "d-1", expires_at=timezone.now() + timedelta(hours=1))
    gone = token_factory(tenant, "d-2", expires_at=timezone.now() - timedelta(seconds=1))

    assert auth.authenticate(bearer(soon)).expires_at is not None
    with pytest.raises(auth.AuthRefused, match="expired"):
        auth.authenticate(bearer(gone))


def test_authenticate__inactive_tenant_refused(tenant, token_factory):
    token = token_factory(tenant)
    assert auth.authenticate(bearer(token)).tenant_id == tenant.id
    tenant.is_active = False
    tenant.save()

    with pytest.raises(auth.AuthRefused, match="inactive"):
        auth.authenticate(bearer(token))


# --- operator session cookie ------------------------------------------------------------


@pytest.fixture
def operator(tenant):
    user = get_user_model().objects.create_user("ops", is_staff=True)  # no password: hashing is slow
    OperatorAccess.objects.create(user=user, tenant=tenant)
    client = Client()
    client.force_login(user)
    return user, client.cookies[settings.SESSION_COOKIE_NAME].value


def cookie_scope(session: str, origin: str | None, query: bytes = b"") -> dict:
    headers = [(b"cookie", f"csrftoken=x; {settings.SESSION_COOKIE_NAME}={session}".encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"headers": headers, "subprotocols": ["tyrum-v1"], "query_string": query}


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
def test_authenticate__session_from_allowed_origin_accepted(tenant, operator):
    user, session = operator

    principal = auth.authenticate(cookie_scope(session, OPS))

    assert principal == auth.Principal(tenant.id, f"operator-{user.pk}", "operator", None, None, user.pk)


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
@pytest.mark.parametrize("origin", [None, "", "http://evil.example", "https://ops.example", "http://ops.example:80"])
def test_authenticate__session_from_other_origin_refused(operator, origin):
    _, session = operator

    with pytest.raises(auth.AuthRefused, match="origin"):
        auth.authenticate(cookie_scope(session, origin))


def test_authenticate__session_refused_when_no_origin_allowed(operator):
    _, session = operator

    with override_settings(BACKPLANE={"ALLOWED_ORIGINS": []}), pytest.raises(auth.AuthRefused):
        auth.authenticate(cookie_scope(session, OPS))


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
def test_authenticate__session_needs_operator_access(tenant, operator):
    user, session = operator
    OperatorAccess.objects.filter(user=user).delete()

    with pytest.raises(auth.AuthRefused):
        auth.authenticate(cookie_scope(session, OPS))


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
def test_authenticate__session_with_two_tenants_needs_tenant_query(tenant, tenant_factory, operator):
    user, session = operator
    other = tenant_factory("other")
    OperatorAccess.objects.create(user=user, tenant=other)

    with pytest.raises(auth.AuthRefused, match="tenant"):
        auth.authenticate(cookie_scope(session, OPS))
    assert auth.authenticate(cookie_scope(session, OPS, b"tenant=other")).tenant_id == other.id


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
def test_authenticate__stale_or_unknown_session_refused(operator):
    user, session = operator

    with pytest.raises(auth.AuthRefused):
        auth.authenticate(cookie_scope("not-a-session-key", OPS))
    user.set_password("changed")  # invalidates the session's auth hash
    user.save()
    with pytest.raises(auth.AuthRefused, match="stale"):
        auth.authenticate(cookie_scope(session, OPS))


@override_settings(BACKPLANE={"ALLOWED_ORIGINS": [OPS]})
def test_authenticate__session_of_inactive_tenant_refused(tenant, operator):
    _, session = operator
    tenant.is_active = False
    tenant.save()

    with pytest.raises(auth.AuthRefused):
        auth.authenticate(cookie_scope(session, OPS))
