"""The producer API: ``publish``, ``publish_many``, ``publish_command`` and ``resolve_tenant``.

Contract:

- ``publish``/``publish_many`` insert inside the caller's transaction (durable append);
  a rolled-back transaction publishes nothing. The relay's doorbell rings on commit only.
- Publishing the same ``(tenant, event_id)`` twice is idempotent: the second is a no-op.
- Bad input raises a named ``PublishError`` subclass and writes nothing.

Validation, event ids and encoding are pure (``backplane.events``); the rows are written by
the store (``backplane.store``), the only code that writes outbox rows.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from backplane import doorbell, exceptions, redaction, streams
from backplane.conf import conf
from backplane.events import build_all, build_one, command_event_id, new_event_ids
from backplane.models import Tenant
from backplane.store import get_store

__all__ = ["publish", "publish_command", "publish_many", "resolve_tenant"]


def resolve_tenant(tenant: Tenant | uuid.UUID | str) -> Tenant:
    """Return the active tenant given as object, id or slug."""
    if isinstance(tenant, Tenant):
        # Re-read: the caller's object may be stale (deleted or deactivated since loaded).
        obj = Tenant.objects.filter(pk=tenant.pk).first()
        if obj is None:
            raise exceptions.UnknownTenant(f"no tenant {tenant.pk}")
    else:
        try:
            key = tenant if isinstance(tenant, uuid.UUID) else uuid.UUID(str(tenant))
            obj = Tenant.objects.get(pk=key)
        except (ValueError, Tenant.DoesNotExist):
            try:
                obj = Tenant.objects.get(slug=str(tenant))
            except Tenant.DoesNotExist:
                raise exceptions.UnknownTenant(f"no tenant {tenant!r}") from None
    if not obj.is_active:
        raise exceptions.InactiveTenant(f"tenant {obj.slug!r} is not active")
    return obj


def publish(
    tenant: Tenant | uuid.UUID | str,
    type: str,
    payload: Any,
    *,
    device: str | None = None,
    role: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> str:
    """Append one event to the outbox inside the current transaction; return its event id.

    At-least-once: peers may see it more than once and dedupe by event id. Idempotent on
    ``(tenant, event_id)``. Raises a ``PublishError`` subclass and writes nothing on bad input.
    """
    tenant_id, shard = _placed(tenant)
    # One event: its fields straight to events.build_one and the store's append_one, none of
    # publish_many's per-call lists, generator and mapping (same checks, in the same order).
    row = build_one(
        tenant_id,
        type,
        payload,
        device,
        role,
        new_event_ids(1)[0] if event_id is None else event_id,
        occurred_at or timezone.now(),
        _patterns(tuple(conf.REDACT_PATTERNS)),
        conf.MAX_PAYLOAD_BYTES,
    )
    try:
        rung = get_store().append_one(tenant_id, shard, row)
    except exceptions.UnknownTenant:
        if isinstance(tenant, Tenant | uuid.UUID):
            raise
        obj = resolve_tenant(tenant)  # a slug that looks like a UUID
        return publish(obj, type, payload, device=device, role=role, event_id=event_id, occurred_at=occurred_at)
    if not rung:
        transaction.on_commit(lambda: doorbell.ring(shard))
    return row[1]


def publish_many(tenant: Tenant | uuid.UUID | str, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Append several events of one tenant in one statement; return their event ids.

    Each event is a mapping with ``type`` and ``payload`` and optionally ``device``,
    ``role``, ``event_id``, ``occurred_at``. All are validated before anything is written.
    The store checks the tenant exists and is active in the same statement; only a slug is
    looked up first.
    """
    specs = list(events)
    tenant_id, shard = _placed(tenant)
    rows = build_all(tenant_id, specs, _patterns(tuple(conf.REDACT_PATTERNS)), timezone.now(), conf.MAX_PAYLOAD_BYTES)
    try:
        event_ids = get_store().append(tenant_id, shard, rows, len(specs))
    except exceptions.UnknownTenant:
        if isinstance(tenant, Tenant | uuid.UUID):
            raise
        return publish_many(resolve_tenant(tenant), specs)  # a slug that looks like a UUID
    if event_ids:
        transaction.on_commit(lambda: doorbell.ring(shard))
    return event_ids


def publish_command(tenant_id: uuid.UUID, edge_id: str, command: str, args: Mapping[str, Any]) -> str:
    """Append a directed command for one edge (carried like an event, to ``bp.edge.<id>``)."""
    shard = streams.shard_of(tenant_id, conf.SHARDS)
    body = {"command": command, "tenant_id": str(tenant_id), **args}
    event_id = command_event_id()
    get_store().append_command(tenant_id, shard, streams.edge_stream(edge_id), event_id, command, body)
    transaction.on_commit(lambda: doorbell.ring(shard))
    return event_id


@functools.lru_cache(maxsize=8)
def _patterns(configured: tuple[str, ...]) -> tuple[str, ...]:
    return redaction.normalise_patterns(configured)


def _placed(tenant: Tenant | uuid.UUID | str) -> tuple[uuid.UUID, int]:
    """The tenant's id (a slug looked up) and its shard."""
    tenant_id = _known_id(tenant)
    if tenant_id is None:
        tenant_id = resolve_tenant(tenant).id
    return tenant_id, streams.shard_of(tenant_id, conf.SHARDS)


def _known_id(tenant: Tenant | uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(tenant, Tenant):
        return tenant.id
    if isinstance(tenant, uuid.UUID):
        return tenant
    try:
        return uuid.UUID(str(tenant))
    except ValueError:
        return None
