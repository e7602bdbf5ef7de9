"""Authentication of connections: the upgrade request's credential, and the heartbeat's
re-check of live sockets (tokens themselves: ``tokens.py``).

Authentication order (PROTOCOL.md):
``Authorization: Bearer``, then the ``tyrum-auth.<base64url>`` subprotocol, then an
operator's Django session cookie from an allowed ``Origin`` or the edge's own. A URL
carrying a credential is refused whatever else the request carries. A socket lives only as
long as its credential: its token (revoked, expired) or its operator's session (logout,
password change, expiry).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http.cookies import SimpleCookie
from importlib import import_module
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.base import SessionBase
from django.contrib.sessions.backends.db import SessionStore as DbSessionStore
from django.db import DatabaseError, connection
from django.db.models import Q
from django.db.models.expressions import RawSQL
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from backplane import exceptions, protocol
from backplane.conf import conf
from backplane.models import AccessToken, OperatorAccess
from backplane.tokens import hash_token, record_expired

logger = logging.getLogger(__name__)


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


def url_has_credential(query_string: bytes) -> bool:
    """Whether a query string names a credential parameter, split on ``&`` or on ``;`` (some
    servers and proxies read either)."""
    text = query_string.decode("latin1")
    try:
        pairs = parse_qsl(text, keep_blank_values=True) + parse_qsl(text, keep_blank_values=True, separator=";")
    except ValueError:
        return True
    return any(name.strip().lower() in protocol.URL_CREDENTIAL_PARAMS for name, _ in pairs)


def _headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def subprotocol_token(subprotocols: list[str]) -> str | None:
    for proto in subprotocols:
        if proto.startswith(protocol.AUTH_SUBPROTOCOL_PREFIX):
            encoded = proto[len(protocol.AUTH_SUBPROTOCOL_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise AuthRefused("malformed tyrum-auth subprotocol") from None
    return None


def authenticate(scope: dict[str, Any]) -> Principal:
    """Return the principal of an upgrade request, or raise AuthRefused / StoreUnavailable."""
    result = authenticate_many([scope])[0]
    if isinstance(result, BaseException):
        raise result
    return result


def authenticate_many(scopes: Sequence[dict[str, Any]]) -> list[Principal | AuthRefused]:
    """The principal of each upgrade request, or its AuthRefused, in order: the tokens of all
    of them looked up in one query (a connect storm's handshakes arrive together). Raises
    StoreUnavailable for them all when the database fails."""
    out: list[Principal | AuthRefused | None] = [None] * len(scopes)
    wanted: dict[int, str] = {}  # position -> token hash
    try:
        for n, scope in enumerate(scopes):
            try:
                headers = _headers(scope)
                token = _token_of(scope, headers)
                if token is not None:
                    wanted[n] = hash_token(token)
                elif b"cookie" in headers:
                    out[n] = _by_session(scope, headers)
                else:
                    raise AuthRefused("no credential")
            except AuthRefused as exc:
                out[n] = exc
        if wanted:
            found = _token_rows_of(set(wanted.values()))
            rows = {row[0]: _TokenRow(*row[1:]) for row in found}  # plain rows: no model per socket
            now = timezone.now()
            expired: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID, str, datetime | None]] = {}
            for n, digest in wanted.items():
                out[n] = _check_token(rows.get(digest), now, expired)
            if expired:
                record_expired(list(expired.values()))  # audited once per token, however many sockets
    except DatabaseError as exc:
        raise exceptions.StoreUnavailable(type(exc).__name__) from exc
    return [r if r is not None else AuthRefused("no credential") for r in out]


def _token_of(scope: dict[str, Any], headers: dict[bytes, bytes]) -> str | None:
    """The token an upgrade request offers (``Authorization: Bearer``, then the auth
    subprotocol), or None; AuthRefused when the offer is malformed."""
    value = headers.get(b"authorization")
    if value is not None:
        scheme, _, token = value.decode("latin1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthRefused("unsupported Authorization scheme")
        return token.strip()
    return subprotocol_token(list(scope.get("subprotocols") or []))


_TOKEN_FIELDS = ("token_hash", "id", "tenant_id", "device_id", "role", "revoked_at", "expires_at", "tenant__is_active")


@functools.cache
def _token_rows() -> Any:
    """The token rows' query with its columns and join resolved once per process (never
    evaluated itself: each batch filters a copy). Resolving ``values_list`` with the join
    was most of a credential batch's Python time in a connect storm (docs/decisions/0026)."""
    return AccessToken.objects.values_list(*_TOKEN_FIELDS)


# _token_rows() as one statement with one array parameter for any number of hashes (PostgreSQL).
_ROWS_BY_HASH_SQL = (
    "SELECT t.token_hash, t.id, t.tenant_id, t.device_id, t.role, t.revoked_at, t.expires_at, n.is_active"
    " FROM backplane_accesstoken t JOIN backplane_tenant n ON n.id = t.tenant_id WHERE t.token_hash = ANY(%s)"
)


def _token_rows_of(hashes: set[str]) -> Iterable[tuple[Any, ...]]:
    """The rows (``_TOKEN_FIELDS``) of the tokens with these hashes. On PostgreSQL one fixed
    SQL text, not the ORM: compiling the filtered query was ~0.3 ms of Python per credential
    batch, holding the GIL the event loop needs (docs/decisions/0038)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute(_ROWS_BY_HASH_SQL, [list(hashes)])
            rows: list[tuple[Any, ...]] = cur.fetchall()
            return rows
    return _token_rows().filter(token_hash__in=hashes)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _TokenRow:
    id: uuid.UUID
    tenant_id: uuid.UUID
    device_id: str
    role: str
    revoked_at: datetime | None
    expires_at: datetime | None
    tenant_active: bool


def _check_token(
    row: _TokenRow | None,
    now: datetime,
    expired: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID, str, datetime | None]],
) -> Principal | AuthRefused:
    if row is None:
        return AuthRefused("unknown token")
    if row.revoked_at is not None:
        return AuthRefused("revoked token")
    if row.expires_at is not None and row.expires_at <= now:
        expired[row.id] = (row.id, row.tenant_id, row.device_id, row.expires_at)
        return AuthRefused("expired token")
    if not row.tenant_active:
        return AuthRefused("inactive tenant")
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


def same_origin(scope: dict[str, Any], headers: dict[bytes, bytes], origin: str) -> bool:
    """Whether ``origin`` is the edge's own: the request's scheme and ``Host`` (already checked
    against ``ALLOWED_HOSTS`` by ``asgi.AllowedHosts``), as a page the edge served sends it."""
    host = headers.get(b"host", b"").decode("latin1")
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    return bool(host) and origin == f"{scheme}://{host}"


def _by_session(scope: dict[str, Any], headers: dict[bytes, bytes]) -> Principal:
    origin = headers.get(b"origin", b"").decode("latin1")
    # A page of this edge (the admin's live view) may use its session without configuring origins.
    if not origin or not (origin in conf.ALLOWED_ORIGINS or same_origin(scope, headers, origin)):
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
    if not isinstance(token_ids, frozenset):
        token_ids = frozenset(token_ids)
    if token_ids:
        found = (
            AccessToken.objects.filter(id__in=_ids(token_ids))
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


_last_ids: tuple[frozenset[uuid.UUID], str] = (frozenset(), "[]")


def _ids(ids: frozenset[uuid.UUID]) -> RawSQL:
    """``ids`` as one bound JSON text: an edge's heartbeat names thousands of tokens, and an
    ``IN`` list of them is prepared by Django element by element (most of an idle edge's beat).
    The heartbeat passes the same frozenset until a socket comes or goes: its text is kept
    (0033). Hex without dashes: PostgreSQL's ``uuid`` reads it, and it is cheaper to make."""
    global _last_ids
    if _last_ids[0] is ids:
        text = _last_ids[1]
    else:
        text = json.dumps([i.hex for i in ids])
        _last_ids = (ids, text)
    if connection.vendor == "postgresql":
        return RawSQL("SELECT value::uuid FROM jsonb_array_elements_text(%s::jsonb)", [text])
    return RawSQL("SELECT value FROM json_each(%s)", [text])


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
