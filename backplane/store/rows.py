"""Rows as the store hands them out: small frozen dataclasses, each made by one mapping.

Every query that yields one of them selects its columns in the order named here (the
``*_COLUMNS`` tuples), whatever the backend; ``tests/integration/test_migrations.py`` checks
the PostgreSQL queries' and ``bp_assign_v2``'s result columns against these names.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backplane.streams import Item

__all__ = ["HEAD_COLUMNS", "ITEM_COLUMNS", "PENDING_COLUMNS", "Head", "Item", "Pending", "head", "item", "pending"]

# bp_assign_v2 returns these with an ``r_`` prefix (PL/pgSQL output parameters share the body's
# namespace with the tables' columns: unprefixed they would be ambiguous there).
PENDING_COLUMNS = (
    "id",
    "part",
    "epoch",
    "kind",
    "stream",
    "shard",
    "offset",
    "event_id",
    "type",
    "occurred_at",
    "payload",
    "tenant_id",
)
HEAD_COLUMNS = ("key", "epoch", "last_offset", "first_retained_offset")
ITEM_COLUMNS = ("stream_offset", "event_id", "type", "occurred_at", "payload")


@dataclass(frozen=True)
class Head:
    """A stream's position: its epoch, its last assigned offset and the lowest one retained."""

    epoch: str
    offset: int
    first_retained: int


@dataclass(frozen=True)
class Pending:
    """An assigned row that no relay has recorded as forwarded yet."""

    id: int
    kind: str
    stream: str
    epoch: str
    shard: int
    item: Item
    tenant_id: Any = None
    part: str | None = None  # PostgreSQL: the partition holding the row (where its mark goes)


def iso(value: datetime | str) -> str:
    """An ISO 8601 UTC text with ``Z`` for a database time (SQLite hands back naive UTC text)."""
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def item(row: Sequence[Any]) -> Item:
    """An ``Item`` from a row of ``ITEM_COLUMNS``."""
    offset, event_id, type_, occurred_at, payload = row
    return Item(offset, event_id, type_, iso(occurred_at), payload)


def head(row: Sequence[Any]) -> tuple[str, Head]:
    """(key, ``Head``) from a row of ``HEAD_COLUMNS``."""
    key, epoch, last_offset, first_retained = row
    return key, Head(epoch, last_offset, first_retained)


def pending(row: Sequence[Any]) -> Pending:
    """A ``Pending`` from a row of ``PENDING_COLUMNS``."""
    id_, part, epoch, kind, stream, shard, offset, event_id, type_, occurred_at, payload, tenant_id = row
    if not isinstance(tenant_id, uuid.UUID):  # SQLite stores UUIDs as hex text
        tenant_id = uuid.UUID(tenant_id)
    return Pending(
        id_, kind, stream, epoch, shard, Item(offset, event_id, type_, iso(occurred_at), payload), tenant_id, part
    )


def in_send_order(rows: list[Pending]) -> list[Pending]:
    """``rows`` sorted by stream, then offset: the order a relay sends them in."""
    rows.sort(key=lambda p: (p.stream, p.item.offset))
    return rows
