"""Access tokens: issue, rotation, revocation, and the audit of a token's life.

Tokens are shown once at creation and stored only as SHA-256 hashes; they expire after
``TOKEN_LIFETIME_SECS`` unless no expiry is asked for. Every creation, rotation, revocation and
expiry leaves a ``TokenAudit`` record (who, when, which token id; never the token) and a
structured log line (``action="token_audit"``). Authentication of connections is ``auth.py``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import uuid
from datetime import datetime, timedelta
from typing import IO, Literal

from django.db import transaction
from django.utils import timezone

from backplane import exceptions, protocol, streams
from backplane.conf import conf
from backplane.models import AccessToken, Connection, Tenant, TokenAudit

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "tyr_"  # noqa: S105  (a public prefix, not a secret)


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
