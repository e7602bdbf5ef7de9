"""The connection directory, read side: presence and status summaries."""

from __future__ import annotations

import uuid
from typing import Any

from django.utils import timezone

from backplane.models import Connection, Tenant


def presence(tenant: Tenant | uuid.UUID | str) -> list[dict[str, Any]]:
    """Return the devices of a tenant online now: device id, roles and edges."""
    from backplane.outbox import resolve_tenant

    obj = resolve_tenant(tenant)
    rows = (
        Connection.objects.filter(tenant=obj, expires_at__gt=timezone.now())
        .values_list("device_id", "role", "edge_id")
        .order_by("device_id")
    )
    devices: dict[str, dict[str, Any]] = {}
    for device_id, role, edge_id in rows:
        entry = devices.setdefault(
            device_id, {"device_id": device_id, "roles": set(), "edges": set(), "connections": 0}
        )
        entry["roles"].add(role)
        entry["edges"].add(edge_id)
        entry["connections"] += 1
    return [{**d, "roles": sorted(d["roles"]), "edges": sorted(d["edges"])} for d in devices.values()]
