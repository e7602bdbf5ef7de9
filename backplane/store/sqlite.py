"""The SQLite store: the embedded mode's backend (statements in ``sql/sqlite.sql``).

One process, one relay: it owns every shard, and its "session" is Django's connection on the
database thread. Offsets are assigned in Python, in one transaction (SQLite serialises writers:
nothing else assigns meanwhile). The outbox is a plain table.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async
from django.db import connection, transaction
from django.utils import timezone

from backplane import exceptions, streams
from backplane.claims import ClaimFloor
from backplane.events import EventRow, first_of_each
from backplane.models import OutboxItem
from backplane.store import common, queries, rows
from backplane.store.base import chunks
from backplane.store.rows import Head, Item, Pending

SQL = queries.load("sqlite.sql")

# Rows per INSERT (bound-parameter limits).
INSERT_CHUNK = 500


class _Session:
    """The embedded relay's session: nothing to hold (the relay owns every shard)."""

    closed = False


class SQLiteStore:
    """``backplane.store.base.Store`` on SQLite."""

    vendor = "sqlite"
    single_thread = True

    # --- producer side -----------------------------------------------------------------------

    def append(self, tenant_id: uuid.UUID, shard: int, rows: Iterable[EventRow], count: int) -> list[str]:
        built = list(rows)  # all validated before anything is written
        if not built:
            return []
        tid = tenant_id.hex
        with transaction.atomic(savepoint=False), connection.cursor() as cur:
            cur.execute(SQL["tenant_state"], [tid])
            state = cur.fetchone()
            if state is None:
                raise exceptions.UnknownTenant(f"no tenant {tenant_id}")
            if not state[0]:
                raise exceptions.InactiveTenant(f"tenant {tenant_id} is not active")
            fresh: set[str] = set()
            unique = first_of_each(built, set())
            for chunk in chunks(unique, INSERT_CHUNK):
                cur.execute(SQL["insert_keys"], [tid, json.dumps([r[1] for r in chunk])])
                fresh.update(e for (e,) in cur.fetchall())
            OutboxItem.objects.bulk_create(
                [
                    OutboxItem(
                        tenant_id=tenant_id,
                        kind="event",
                        stream=st,
                        event_id=eid,
                        type=et,
                        occurred_at=at,
                        payload=json.loads(text),
                        payload_bytes=size,
                        shard=shard,
                    )
                    for st, eid, et, at, text, size in unique
                    if eid in fresh
                ],
                batch_size=INSERT_CHUNK,
            )
        return [row[1] for row in built]

    def append_one(self, tenant_id: uuid.UUID, shard: int, row: EventRow) -> bool:
        self.append(tenant_id, shard, [row], 1)
        return False

    def append_command(
        self, tenant_id: uuid.UUID, shard: int, stream: str, event_id: str, command: str, body: Mapping[str, Any]
    ) -> None:
        common.append_command(tenant_id, shard, stream, event_id, command, body)

    # --- relay side --------------------------------------------------------------------------

    async def aopen_session(self) -> _Session:
        return _Session()

    async def aclose_session(self, session: Any) -> None:
        session.closed = True

    def is_dead(self, session: Any) -> bool:
        return session is None or session.closed

    async def aping(self, session: Any) -> None:
        return None

    async def atake_shards(self, session: Any, shards: Sequence[int]) -> list[int]:
        return list(shards)

    async def aassign(
        self,
        session: Any,
        shards: Sequence[int],
        limit: int,
        *,
        only_tenant: Any = None,
        skip_tenants: Sequence[Any] = (),
        forwarded: Sequence[Pending] = (),
        floor: ClaimFloor | None = None,  # PostgreSQL's: SQLite's claim has no dead index entries to walk
    ) -> list[Pending]:
        return await database_sync_to_async(self._assign_and_mark)(shards, limit, only_tenant, skip_tenants, forwarded)

    async def amark_forwarded(self, session: Any, pending: Sequence[Pending]) -> None:
        await database_sync_to_async(self.mark_forwarded)([p.id for p in pending])

    def _assign_and_mark(
        self,
        shards: Sequence[int],
        limit: int,
        only_tenant: Any,
        skip_tenants: Sequence[Any],
        forwarded: Sequence[Pending],
    ) -> list[Pending]:
        with transaction.atomic():
            self.mark_forwarded([p.id for p in forwarded])
            return self.assign(shards, limit, only_tenant=only_tenant, skip_tenants=skip_tenants)

    def assign(
        self, shards: Sequence[int], limit: int, *, only_tenant: Any = None, skip_tenants: Sequence[Any] = ()
    ) -> list[Pending]:
        if not shards:
            return []
        only = None if only_tenant is None else _hex(only_tenant)
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(SQL["claim"], [json.dumps(list(shards)), only, only, _hexes(skip_tenants), limit])
            claimed = cur.fetchall()
            if not claimed:
                return []
            per_stream: dict[str, list[int]] = {}
            tenant_of: dict[str, str] = {}
            for row_id, stream, tenant_id in claimed:
                per_stream.setdefault(stream, []).append(row_id)
                tenant_of[stream] = tenant_id
            bumps = [
                [key, tenant_of[key], streams.audience_of(key), streams.new_epoch(), len(per_stream[key])]
                for key in sorted(per_stream)  # a fixed lock order
            ]
            cur.execute(SQL["bump_heads"], [json.dumps(bumps)])
            last = {key: last_offset for key, last_offset, _epoch in cur.fetchall()}
            now = timezone.now()
            updates = []
            for key, row_ids in per_stream.items():
                first = last[key] - len(row_ids) + 1
                updates += [(first + n, now, row_id) for n, row_id in enumerate(row_ids)]
            cur.executemany(SQL["set_offset"], updates)
            cur.execute(SQL["assigned"], [json.dumps([row_id for _, _, row_id in updates])])
            return rows.in_send_order([rows.pending(r) for r in cur.fetchall()])

    def unforwarded(self, shards: Sequence[int], limit: int, *, skip_tenants: Sequence[Any] = ()) -> list[Pending]:
        if not shards:
            return []
        with connection.cursor() as cur:
            cur.execute(SQL["unforwarded"], [json.dumps(list(shards)), _hexes(skip_tenants), limit])
            return [rows.pending(r) for r in cur.fetchall()]

    def mark_forwarded(self, ids: Sequence[int], parts: Sequence[str | None] | None = None) -> None:
        if not ids:
            return
        with connection.cursor() as cur:
            cur.execute(SQL["mark_forwarded"], [timezone.now(), json.dumps(list(ids))])

    def pending_tenants(self, shards: Sequence[int]) -> list[Any]:
        with connection.cursor() as cur:
            cur.execute(SQL["pending_tenants"], [json.dumps(list(shards))])
            return [uuid.UUID(t) for (t,) in cur.fetchall()]

    def ensure_partitions(self) -> int:
        return 0  # a plain table

    # --- edge side ---------------------------------------------------------------------------

    def ensure_streams(self, tenant_id: uuid.UUID, keys: Sequence[str]) -> dict[str, Head]:
        return self.open_streams(dict.fromkeys(keys, tenant_id))

    def open_streams(self, tenants: Mapping[str, uuid.UUID]) -> dict[str, Head]:
        epochs = streams.new_epochs(len(tenants))
        new = [
            [key, tenant.hex, streams.audience_of(key), epochs[n]] for n, (key, tenant) in enumerate(tenants.items())
        ]
        with connection.cursor() as cur:
            cur.execute(SQL["ensure_streams"], [json.dumps(new)])
        return self.stream_heads(list(tenants))

    def stream_heads(self, keys: Sequence[str]) -> dict[str, Head]:
        if not keys:
            return {}
        with connection.cursor() as cur:
            cur.execute(SQL["stream_heads"], [json.dumps(list(keys))])
            return dict(rows.head(r) for r in cur.fetchall())

    def heads_moved_since(self, since: datetime | None) -> tuple[datetime, dict[str, Head]]:
        text = None if since is None else since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        with connection.cursor() as cur:
            cur.execute(SQL["heads_moved_since"], [text])
            found = cur.fetchall()
        now = datetime.fromisoformat(found[0][0]).replace(tzinfo=UTC)
        return now, dict(rows.head(r[1:]) for r in found if r[1] is not None)

    def read_range(self, stream_key: str, after: int, upto: int) -> list[Item]:
        if upto <= after:
            return []
        with connection.cursor() as cur:
            cur.execute(SQL["read_range"], [stream_key, after, upto])
            return [rows.item(r) for r in cur.fetchall()]

    # --- maintenance -------------------------------------------------------------------------

    cutoff_sql = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || %s || ' seconds')"

    @contextlib.contextmanager
    def compactor_lock(self) -> Iterator[bool]:
        yield True  # writers are serialised by the database file itself

    def summarize_indexes(self) -> None:
        return None  # no BRIN indexes

    def drop_expired_partitions(self, retention_secs: float) -> tuple[int, int, int]:
        return 0, 0, 0  # a plain table

    def expire_keys(self, retention_secs: float, batch: int) -> int:
        with connection.cursor() as cur:
            cur.execute(SQL["expire_keys"], [retention_secs, batch])
            return int(cur.rowcount)

    def reclaim(self, tables: Sequence[str]) -> None:
        return None  # deleted pages are reused by the file as they are


def _hex(tenant_id: Any) -> str:
    return (tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(str(tenant_id))).hex


def _hexes(tenant_ids: Sequence[Any]) -> str:
    return json.dumps([_hex(t) for t in tenant_ids])
