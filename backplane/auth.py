"""Peer credentials: token issue, rotation, revocation and their audit, the upgrade
request's checks, and the heartbeat's re-check of live sockets.

Tokens are shown once at creation and stored only as SHA-256 hashes; they expire after
``TOKEN_LIFETIME_SECS`` unless no expiry is asked for. Authentication order (PROTOCOL.md):
``Authorization: Bearer``, then the ``tyrum-auth.<base64url>`` subprotocol, then an
operator's Django session cookie from an allowed ``Origin``. A URL carrying a credential is
refused whatever else the request carries. A socket lives only as long as its credential:
its token (revoked, expired) or its operator's session (logout, password change, expiry).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.cookies import SimpleCookie
from importlib import import_module
from typing import IO, Any, Literal
from urllib.parse import parse_qsl

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.base import SessionBase
from django.contrib.sessions.backends.db import SessionStore as DbSessionStore
from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from backplane import exceptions, protocol, streams
from backplane.conf import conf
from backplane.models import AccessToken, Connection, OperatorAccess, Tenant, TokenAudit

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
    # Their session key: a credential like a token, so never shown, logged or compared.
    session_key: str | None = field(default=None, repr=False, compare=False)

    @property
    def recheck_key(self) -> Any:
        """What ``recheck`` knows this socket's credential by: its token id, or its operator
        session as (tenant id, user id, session key)."""
        return self.token_id or (self.tenant_id, self.user_id, self.session_key)


class Lifetime(enum.Enum):
    """``create_token``'s default expiry: ``conf.TOKEN_LIFETIME_SECS`` from now."""

    DEFAULT = "default"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_argument(arg: str, stdin: IO[str]) -> uuid.UUID | str:
    """A command's token argument: a token id, or ``-`` to read the token itself from
    ``stdin``. A token on the command line is refused: ``ps`` shows it, shell history keeps it."""
    if arg == "-":
        token = stdin.readline().strip()
        if not token:
            raise exceptions.TokenError("no token on standard input")
        return token
    try:
        return uuid.UUID(arg)
    except ValueError:
        pass
    what = "that looks like a token" if arg.strip().startswith(TOKEN_PREFIX) else "not a token id"
    raise exceptions.TokenError(
        f"{what}: give the token's id, or '-' and the token on standard input "
        "(a token on the command line is seen by ps and kept in shell history)"
    )


def audit(actor: str, action: str, row: AccessToken, note: str = "") -> None:
    """Record one event of a token's life (never the token or its hash), and log it once the
    transaction commits."""
    TokenAudit.objects.create(
        actor=actor, action=action, token_id=row.id, tenant_id=row.tenant_id, device_id=row.device_id, note=note
    )
    transaction.on_commit(lambda: _log_audit(actor, action, row.id, row.tenant_id, row.device_id))


def _log_audit(actor: str, action: str, token_id: uuid.UUID, tenant_id: uuid.UUID, device_id: str) -> None:
    logger.info(
        "token %s: %s of tenant %s device %s by %s",
        action,
        token_id,
        tenant_id,
        device_id,
        actor,
        extra={
            "action": "token_audit",
            "token_action": action,
            "token_id": str(token_id),
            "tenant_id": str(tenant_id),
            "device_id": device_id,
            "actor": actor,
        },
    )


def create_token(
    tenant: Tenant,
    device_id: str,
    role: str,
    *,
    label: str = "",
    expires_at: datetime | None | Literal[Lifetime.DEFAULT] = Lifetime.DEFAULT,
    actor: str = "system",
) -> tuple[AccessToken, str]:
    """Create a token; return the row and the token itself (shown once, never stored).

    It expires after ``conf.TOKEN_LIFETIME_SECS`` unless ``expires_at`` is given; ``None``
    asks for no expiry. The creation is audited.
    """
    with transaction.atomic():
        row, token = _issue(tenant, device_id, role, label, expires_at)
        audit(actor, "create", row)
    return row, token


def _issue(
    tenant: Tenant, device_id: str, role: str, label: str, expires_at: datetime | None | Literal[Lifetime.DEFAULT]
) -> tuple[AccessToken, str]:
    if not streams.DEVICE_ID_RE.match(device_id):
        raise exceptions.TokenError(f"malformed device id {device_id!r}")
    if role not in streams.ROLES:
        raise exceptions.TokenError(f"role must be one of {', '.join(streams.ROLES)}")
    if expires_at is Lifetime.DEFAULT:
        expires_at = timezone.now() + timedelta(seconds=conf.TOKEN_LIFETIME_SECS)
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


def find_token(token_or_id: str | uuid.UUID | AccessToken, *, for_update: bool = False) -> AccessToken:
    """Return a token row by its id, by the token itself, or afresh from a row."""
    rows = AccessToken.objects.select_for_update() if for_update else AccessToken.objects.all()
    if isinstance(token_or_id, AccessToken):
        token_or_id = token_or_id.pk
    try:
        pk = token_or_id if isinstance(token_or_id, uuid.UUID) else uuid.UUID(token_or_id)
        return rows.get(pk=pk)
    except (ValueError, AccessToken.DoesNotExist):
        pass
    try:
        return rows.get(token_hash=hash_token(str(token_or_id)))
    except AccessToken.DoesNotExist:
        raise exceptions.TokenError("no such token") from None


def rotate_token(
    token_or_id: str | uuid.UUID | AccessToken,
    *,
    grace_secs: float | None = None,
    expires_at: datetime | None | Literal[Lifetime.DEFAULT] = Lifetime.DEFAULT,
    actor: str = "system",
) -> tuple[AccessToken, AccessToken, str]:
    """Issue a new token for the same tenant, device, role and label; the old one stays valid
    ``grace_secs`` more (``conf.TOKEN_ROTATION_GRACE_SECS`` by default), never longer than it
    already was. Returns the old row, the new row and the new token. A revoked token is not
    rotated (that would give its holder a way back)."""
    grace = conf.TOKEN_ROTATION_GRACE_SECS if grace_secs is None else grace_secs
    with transaction.atomic():
        old = find_token(token_or_id, for_update=True)
        if old.revoked_at is not None:
            raise exceptions.TokenError(f"token {old.id} is revoked: create a new token instead")
        until = timezone.now() + timedelta(seconds=grace)
        if old.expires_at is not None and old.expires_at <= until:
            until = old.expires_at
        else:
            old.expires_at = until
            old.save(update_fields=["expires_at"])
        new, token = _issue(old.tenant, old.device_id, old.role, old.label, expires_at)
        audit(actor, "rotate", old, note=f"replaced by {new.id}; valid until {until.isoformat(timespec='seconds')}")
        audit(actor, "create", new, note=f"rotation of {old.id}")
    return old, new, token


def revoke_token(token_or_id: str | uuid.UUID | AccessToken, *, actor: str = "system") -> tuple[AccessToken, list[str]]:
    """Revoke a token and tell each edge holding one of its sockets to close it (4008).

    The commands are outbox items in the same transaction, so a revocation is never lost.
    Edges also re-check their sockets' tokens on every heartbeat. Revoking again changes
    nothing but tells the edges again. The first revocation is audited. Returns the edges told.
    """
    from backplane import outbox

    with transaction.atomic():
        row = find_token(token_or_id, for_update=True)
        if row.revoked_at is None:
            row.revoked_at = timezone.now()
            row.save(update_fields=["revoked_at"])
            audit(actor, "revoke", row)
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
        record_expired([(row.id, row.tenant_id, row.device_id, row.expires_at)])
        raise AuthRefused("expired token")
    if not row.tenant.is_active:
        raise AuthRefused("inactive tenant")
    return Principal(row.tenant_id, row.device_id, row.role, row.id, row.expires_at)


def _session_store() -> type[SessionBase]:
    store: type[SessionBase] = import_module(settings.SESSION_ENGINE).SessionStore
    return store


def _session_holds(data: dict[str, Any], user: Any) -> bool:
    """Whether a session's data still logs ``user`` in, as ``django.contrib.auth.get_user``
    decides: the same user, active, and the auth hash of the user's current password (under
    the current or a fallback ``SECRET_KEY``)."""
    stored = data.get(HASH_SESSION_KEY) or ""
    if str(data.get(SESSION_KEY)) != str(user.pk) or not user.is_active or not stored:
        return False
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    return any(constant_time_compare(stored, h) for h in hashes)


def _by_session(scope: dict[str, Any], headers: dict[bytes, bytes]) -> Principal:
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
    session = _session_store()(morsel.value)
    user_id = session.get(SESSION_KEY)
    if user_id is None or session.session_key is None:
        raise AuthRefused("no session")
    try:
        user = get_user_model()._default_manager.get(pk=user_id)
    except get_user_model().DoesNotExist:
        raise AuthRefused("no such user") from None
    if not _session_holds(dict(session.items()), user):
        raise AuthRefused("stale session")
    access = OperatorAccess.objects.filter(user=user, tenant__is_active=True).select_related("tenant")
    wanted = dict(parse_qsl(scope.get("query_string", b"").decode("latin1"))).get("tenant")
    if wanted:
        access = access.filter(tenant__slug=wanted)
    rows = list(access[:2])
    if len(rows) != 1:
        raise AuthRefused("no single tenant for this operator (use ?tenant=<slug>)")
    return Principal(rows[0].tenant_id, f"operator-{user.pk}", "operator", None, None, user.pk, session.session_key)


def recheck(
    token_ids: Iterable[uuid.UUID], operators: Iterable[tuple[Any, Any, str | None]]
) -> dict[Any, protocol.Close]:
    """Re-check the credentials of live sockets (an edge's heartbeat): return, by
    ``Principal.recheck_key``, the close code of each that no longer holds.

    Tokens: 4008 revoked or tenant deactivated, 4401 expired (audited once per token).
    Operators, as (tenant id, user id, session key): 4008 when the access, the tenant or the
    user is gone or the session no longer logs the user in (logout, password change), 4401
    when the session expired.
    """
    now = timezone.now()
    bad: dict[Any, protocol.Close] = {}
    token_ids = set(token_ids)
    if token_ids:
        found = (
            AccessToken.objects.filter(id__in=token_ids)
            .filter(Q(revoked_at__isnull=False) | Q(tenant__is_active=False) | Q(expires_at__lte=now))
            .values_list("id", "revoked_at", "tenant__is_active", "tenant_id", "device_id", "expires_at")
        )
        expired = []
        for tid, revoked_at, active, tenant_id, device_id, expires_at in found:
            if revoked_at is not None or not active:
                bad[tid] = protocol.Close.POLICY
            else:
                bad[tid] = protocol.Close.TOKEN_EXPIRED
                expired.append((tid, tenant_id, device_id, expires_at))
        if expired:
            record_expired(expired)
    operators = set(operators)
    if operators:
        bad.update(_recheck_operators(operators, now))
    return bad


def _recheck_operators(operators: set[tuple[Any, Any, str | None]], now: datetime) -> dict[Any, protocol.Close]:
    access = OperatorAccess.objects.filter(
        tenant_id__in={t for t, _, _ in operators},
        user_id__in={u for _, u, _ in operators},
        tenant__is_active=True,
        user__is_active=True,
    ).select_related("user")
    users = {}
    still = set()
    for row in access:
        still.add((row.tenant_id, row.user_id))
        users[row.user_id] = row.user
    sessions = _sessions({key for _, _, key in operators if key}, now)
    bad: dict[Any, protocol.Close] = {}
    for op in operators:
        tenant_id, user_id, key = op
        if (tenant_id, user_id) not in still:
            bad[op] = protocol.Close.POLICY
        elif key is not None:
            data, expired = sessions.get(key, ({}, False))
            if expired:
                bad[op] = protocol.Close.TOKEN_EXPIRED
            elif not _session_holds(data, users[user_id]):
                bad[op] = protocol.Close.POLICY
    return bad


def _sessions(keys: set[str], now: datetime) -> dict[str, tuple[dict[str, Any], bool]]:
    """The data of each live or expired session among ``keys``, and whether it expired; a
    deleted session (logout) is absent."""
    if not keys:
        return {}
    store = _session_store()
    if issubclass(store, DbSessionStore):
        # The db and cached_db engines: one query for the edge's every operator session.
        decoder = store()
        rows = store.get_model_class().objects.filter(session_key__in=keys)
        return {
            key: (decoder.decode(data), expire <= now)
            for key, data, expire in rows.values_list("session_key", "session_data", "expire_date")
        }
    # Other engines: one load each; theirs cannot tell an expired session from a deleted one.
    loaded = {key: store(key).load() for key in keys}
    return {key: (data, False) for key, data in loaded.items() if data}


def record_expired(rows: list[tuple[uuid.UUID, uuid.UUID, str, datetime | None]]) -> None:
    """Audit tokens found expired (an upgrade refused, a socket closed), once per token: the
    first edge to find one writes its record (a unique index keeps racing edges to one)."""
    known = set(
        TokenAudit.objects.filter(action="expire", token_id__in=[r[0] for r in rows]).values_list("token_id", flat=True)
    )
    new = [r for r in rows if r[0] not in known]
    if not new:
        return
    TokenAudit.objects.bulk_create(
        [
            TokenAudit(
                actor="system",
                action="expire",
                token_id=token_id,
                tenant_id=tenant_id,
                device_id=device_id,
                note=f"expired at {expires_at.isoformat(timespec='seconds')}" if expires_at else "",
            )
            for token_id, tenant_id, device_id, expires_at in new
        ],
        ignore_conflicts=True,
    )
    for token_id, tenant_id, device_id, _ in new:
        _log_audit("system", "expire", token_id, tenant_id, device_id)
