"""What both stores do the same way, through the ORM (off the hot paths)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from django.utils import timezone

from backplane import events
from backplane.models import OutboxItem


def append_command(
    tenant_id: uuid.UUID, shard: int, stream: str, event_id: str, command: str, body: Mapping[str, Any]
) -> None:
    """Insert a directed command's outbox row (``kind = 'command'``, type ``bp.<command>``)."""
    text = events.encode(body)
    OutboxItem.objects.create(
        tenant_id=tenant_id,
        kind="command",
        stream=stream,
        event_id=event_id,
        type=f"bp.{command}",
        occurred_at=timezone.now(),
        payload=body,
        payload_bytes=len(text),
        shard=shard,
    )
