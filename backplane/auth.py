"""Peer credentials: token issue, hashing, revocation, and the upgrade request's checks.

Tokens are shown once at creation and stored only as SHA-256 hashes. Authentication
order (PROTOCOL.md): ``Authorization: Bearer``, then the ``tyrum-auth.<base64url>``
subprotocol, then an operator's Django session cookie from an allowed ``Origin``.
A URL carrying a credential is refused whatever else the request carries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone

from backplane import exceptions, protocol, streams
from backplane.conf import conf
from backplane.models import AccessToken, Connection, OperatorAccess, Tenant

logger = logging.getLogger(__name__)

PROTOCOL = protocol.PROTOCOL
AUTH_SUBPROTOCOL_PREFIX = protocol.AUTH_SUBPROTOCOL_PREFIX
URL_CREDENTIAL_PARAMS = protocol.URL_CREDENTIAL_PARAMS
TOKEN_PREFIX = "tyr_"  # noqa: S105  (a public prefix, not a secret)


class AuthRefused(exceptions.BackplaneError):
    """Raised when an upgrade request's credential is missing or not acceptable (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """Who a connection is: one tenant, one device, one role."""

    tenant_id: uuid.UUID
    device_id: str
    role: str
    token_id: uuid.UUID | None
    expires_at: datetime | None
    user_id: Any = None  # operators authenticated by session cookie


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    tenant: Tenant, device_id: str, role: str, *, label: str = "", expires_at: datetime | None = None
) -> tuple[AccessToken, str]:
    """Create a token; return the row and the token itself (shown once, never stored)."""
    if not streams.DEVICE_ID_RE.match(device_id):
        raise exceptions.TokenError(f"malformed device id {device_id!r}")
    if role not in streams.ROLES:
        raise exceptions.TokenError(f"role must be one of {', '.join(streams.ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = AccessToken.objects.create(
        tenant=tenant,
        device_id=device_id,
        role=role,
        token_hash=hash_token(token),
        label=label,
        expires_at=expires_at,
    )
    return row, token


def find_token(token_or_id: str) -> AccessToken:
    """Return a token row by its id or by the token itself."""
    try:
        return AccessToken.objects.get(pk=uuid.UUID(token_or_id))
    except (ValueError, AccessToken.DoesNotExist):
        pass
    try:
        return AccessToken.objects.get(token_hash=hash_token(token_or_id))
    except AccessToken.DoesNotExist:
        raise exceptions.TokenError("no such token") from None


def revoke_token(token_or_id: str) -> tuple[AccessToken, list[str]]:
    """Revoke a token and tell each edge holding one of its sockets to close it (4008).

    The commands are outbox items in the same transaction, so a revocation is never lost.
    Edges also re-check their sockets' tokens on every heartbeat. Returns the edges told.
    """
    from backplane import outbox

    with transaction.atomic():
        row = find_token(token_or_id)
        if row.revoked_at is None:
            row.revoked_at = timezone.now()
            row.save(update_fields=["revoked_at"])
        edges = sorted(set(Connection.objects.filter(token=row).values_list("edge_id", flat=True)))
        for edge_id in edges:
            outbox.publish_command(
                row.tenant_id, edge_id, "disconnect", {"token_id": str(row.id), "code": int(protocol.Close.POLICY)}
            )
    return row, edges


def url_has_credential(query_string: bytes) -> bool:
    """Whether a query string names a credential parameter, split on ``&`` or on ``;`` (some
    servers and proxies read either)."""
    text = query_string.decode("latin1")
    try:
        pairs = parse_qsl(text, keep_blank_values=True) + parse_qsl(text, keep_blank_values=True, separator=";")
    except ValueError:
        return True
    return any(name.strip().lower() in URL_CREDENTIAL_PARAMS for name, _ in pairs)


def _headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def subprotocol_token(subprotocols: list[str]) -> str | None:
    for proto in subprotocols:
        if proto.startswith(AUTH_SUBPROTOCOL_PREFIX):
            encoded = proto[len(AUTH_SUBPROTOCOL_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise AuthRefused("malformed tyrum-auth subprotocol") from None
    return None


def authenticate(scope: dict[str, Any]) -> Principal:
    """Return the principal of an upgrade request, or raise AuthRefused / StoreUnavailable."""
    headers = _headers(scope)
    try:
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.decode("latin1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthRefused("unsupported Authorization scheme")
            return _by_token(token.strip())
        offered = subprotocol_token(list(scope.get("subprotocols") or []))
        if offered is not None:
            return _by_token(offered)
        if b"cookie" in headers:
            return _by_session(scope, headers)
    except DatabaseError as exc:
        raise exceptions.StoreUnavailable(type(exc).__name__) from exc
    raise AuthRefused("no credential")


def _by_token(token: str) -> Principal:
    try:
        row = AccessToken.objects.select_related("tenant").get(token_hash=hash_token(token))
    except AccessToken.DoesNotExist:
        raise AuthRefused("unknown token") from None
    now = timezone.now()
    if row.revoked_at is not None:
        raise AuthRefused("revoked token")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthRefused("expired token")
    if not row.tenant.is_active:
        raise AuthRefused("inactive tenant")
    return Principal(row.tenant_id, row.device_id, row.role, row.id, row.expires_at)


def _by_session(scope: dict[str, Any], headers: dict[bytes, bytes]) -> Principal:
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.utils.crypto import constant_time_compare

    origin = headers.get(b"origin", b"").decode("latin1")
    if not origin or origin not in conf.ALLOWED_ORIGINS:
        raise AuthRefused("origin not allowed for session auth")
    cookie = SimpleCookie()
    try:
        cookie.load(headers[b"cookie"].decode("latin1"))
    except Exception:
        raise AuthRefused("malformed cookie") from None
    morsel = cookie.get(settings.SESSION_COOKIE_NAME)
    if morsel is None:
        raise AuthRefused("no session")
    session = import_module(settings.SESSION_ENGINE).SessionStore(morsel.value)
    user_id = session.get(SESSION_KEY)
    if user_id is None:
        raise AuthRefused("no session")
    try:
        user = get_user_model()._default_manager.get(pk=user_id)
    except get_user_model().DoesNotExist:
        raise AuthRefused("no such user") from None
    if not user.is_active or not constant_time_compare(session.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash()):
        raise AuthRefused("stale session")
    access = OperatorAccess.objects.filter(user=user, tenant__is_active=True).select_related("tenant")
    wanted = dict(parse_qsl(scope.get("query_string", b"").decode("latin1"))).get("tenant")
    if wanted:
        access = access.filter(tenant__slug=wanted)
    rows = list(access[:2])
    if len(rows) != 1:
        raise AuthRefused("no single tenant for this operator (use ?tenant=<slug>)")
    return Principal(rows[0].tenant_id, f"operator-{user.pk}", "operator", None, None, user.pk)


def recheck(token_ids: Iterable[uuid.UUID], operators: Iterable[tuple[Any, Any]]) -> dict[Any, protocol.Close]:
    """Re-check the credentials of live sockets (an edge's heartbeat): return, by token id
    or (tenant id, user id), the close code of each that no longer holds — 4008 revoked or
    tenant deactivated (or operator access gone), 4401 expired."""
    now = timezone.now()
    bad: dict[Any, protocol.Close] = {}
    token_ids = set(token_ids)
    if token_ids:
        found = (
            AccessToken.objects.filter(id__in=token_ids)
            .filter(Q(revoked_at__isnull=False) | Q(tenant__is_active=False) | Q(expires_at__lte=now))
            .values_list("id", "revoked_at", "tenant__is_active")
        )
        for tid, revoked_at, active in found:
            bad[tid] = protocol.Close.POLICY if (revoked_at is not None or not active) else protocol.Close.TOKEN_EXPIRED
    operators = set(operators)
    if operators:
        still = set(
            OperatorAccess.objects.filter(
                tenant_id__in={t for t, _ in operators},
                user_id__in={u for _, u in operators},
                tenant__is_active=True,
                user__is_active=True,
            ).values_list("tenant_id", "user_id")
        )
        for key in operators - still:
            bad[key] = protocol.Close.POLICY
    return bad
