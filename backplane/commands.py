"""Directed commands: items addressed to one edge, carried through the outbox.

Producers of commands (revocation, operators, the admin) route them with the connection
directory: one command per edge that holds a matching socket. The relay checks each
command's edge before sending it: a command for an edge whose heartbeat has expired is not
sent into the void — it is re-routed to the edges that hold its target now, or recorded as
undeliverable with a reason (``OutboxItem.undeliverable_reason``).

Commands: ``disconnect`` (a token's or a device's sockets, close code 4008 by default),
``resync`` (close 4409: the peers refetch), ``resume`` (close 4001: the peers reconnect and
resume), ``drain`` (the edge closes every socket with 4001 and refuses new ones).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from backplane import outbox
from backplane.conf import conf
from backplane.models import Connection, Edge, OutboxItem, Tenant
from backplane.protocol import Close
from backplane.store import Pending


def live_edges(edge_ids: Sequence[str] | None = None) -> set[str]:
    """Edges whose heartbeat is within the connection TTL."""
    alive = Edge.objects.filter(heartbeat_at__gt=timezone.now() - timedelta(seconds=conf.CONNECTION_TTL_SECS))
    if edge_ids is not None:
        alive = alive.filter(edge_id__in=list(edge_ids))
    return set(alive.values_list("edge_id", flat=True))


def _targets(body: dict[str, Any]) -> set[str]:
    """Live edges holding a socket this command is about."""
    rows = Connection.objects.filter(expires_at__gt=timezone.now())
    if body.get("token_id"):
        rows = rows.filter(token_id=body["token_id"])
    else:
        rows = rows.filter(tenant_id=body["tenant_id"])
        if body.get("device_id"):
            rows = rows.filter(device_id=body["device_id"])
    return live_edges(list(set(rows.values_list("edge_id", flat=True))))


def send(tenant: Tenant | uuid.UUID | str, command: str, **args: Any) -> list[str]:
    """Publish ``command`` to every live edge holding a matching socket; return those edges."""
    tenant_id = tenant.id if isinstance(tenant, Tenant) else outbox.resolve_tenant(tenant).id
    body = {"tenant_id": str(tenant_id), **args}
    with transaction.atomic():
        edges = sorted(_targets(body))
        for edge_id in edges:
            outbox.publish_command(tenant_id, edge_id, command, args)
    return edges


def disconnect_device(tenant: Tenant | uuid.UUID | str, device_id: str, code: int = Close.POLICY) -> list[str]:
    return send(tenant, "disconnect", device_id=device_id, code=code)


def resync(tenant: Tenant | uuid.UUID | str, device_id: str | None = None) -> list[str]:
    return send(tenant, "resync", **({"device_id": device_id} if device_id else {}))


def make_resume(tenant: Tenant | uuid.UUID | str, device_id: str | None = None) -> list[str]:
    return send(tenant, "resume", **({"device_id": device_id} if device_id else {}))


def drain_edge(edge_id: str) -> None:
    """Tell one edge to close all its sockets with 4001 and refuse new ones."""
    edge = Edge.objects.get(edge_id=edge_id)
    tenant = Tenant.objects.order_by("created_at").first()
    if tenant is None:
        raise Tenant.DoesNotExist("a drain command needs at least one tenant to carry it")
    with transaction.atomic():
        outbox.publish_command(tenant.id, edge.edge_id, "drain", {})


def route(pending: Sequence[Pending]) -> set[int]:
    """Handle commands whose edge is not alive; return the ids the relay must not send.

    Each such command is re-routed (a new command per live edge holding its target, in the
    same transaction) or marked undeliverable; either way its reason is recorded.
    """
    edges = {p.stream[2:] for p in pending}
    alive = live_edges(list(edges))
    skip: set[int] = set()
    with transaction.atomic():
        for p in pending:
            edge_id = p.stream[2:]
            if edge_id in alive:
                continue
            body = json.loads(p.item.payload_json)
            command = body.get("command", "")
            targets = set() if command == "drain" else _targets(body) - {edge_id}
            args = {k: v for k, v in body.items() if k not in ("command", "tenant_id")}
            for target in sorted(targets):
                outbox.publish_command(uuid.UUID(body["tenant_id"]), target, command, args)
            reason = (
                f"edge {edge_id} not alive; re-routed to {', '.join(sorted(targets))}"
                if targets
                else f"edge {edge_id} not alive; no live edge holds the target"
            )
            OutboxItem.objects.filter(id=p.id).update(undeliverable_reason=reason[:200])
            skip.add(p.id)
    return skip
