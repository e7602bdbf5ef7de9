"""The storage seam: what the producer API, the relay and the edges need from the database.

``Store`` is implemented once per backend (``postgresql.py``, ``sqlite.py``); ``get_store()``
in ``__init__`` picks one from the database vendor, once. Nothing else asks which backend runs.

The contract every implementation keeps:

- **Idempotent append.** ``append`` writes an event only if its ``(tenant, event_id)`` was not
  written before (within the retention window, while its key is kept); a repeat is a no-op.
  It writes inside the caller's transaction and is all or nothing: on any error nothing of
  the call is written and the caller's transaction stays usable.
- **Offsets contiguous per stream, in commit-visible id order.** ``assign`` claims committed
  rows *that have no offset yet* — never "id > cursor", so a transaction that commits after
  one with a higher id is claimed later, not skipped — and gives each stream's rows the next
  offsets ``last + 1, last + 2, …`` in id order, bumping the stream's head in the same
  transaction. Offsets are never reused or skipped while a stream lives.
- **An epoch per stream.** A stream gets a fresh random epoch whenever it is created (first
  event, first subscriber, or again after compaction pruned it). Offsets restart with a new
  epoch, so a peer resuming with an old epoch is told the stream changed instead of being
  replayed a window that does not match what it saw.
- **At-least-once forwarding.** A row stays in ``unforwarded`` until ``mark_forwarded``: a
  relay that dies after assigning or sending leaves its rows there, with their offsets, for
  the next owner of the shard to send again. Marks may be lost (rows then go twice), never
  written for rows that were not sent.
- **Shard ownership.** ``atake_shards`` gives a relay the shards it may assign; rows of a
  shard are assigned by one relay at a time (PostgreSQL: advisory locks on the relay's own
  session; SQLite: one embedded relay owns every shard).

Producer and edge methods are synchronous (Django's connection, on the calling thread: the
edge runs them in worker threads, on one thread when ``single_thread``). Relay methods that take
a ``session`` are asynchronous and run on the relay's own session (``aopen_session``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from backplane.events import EventRow
from backplane.store.rows import Head, Item, Pending

if TYPE_CHECKING:
    from backplane.claims import ClaimFloor

OUTBOX = "backplane_outboxitem"
STREAM = "backplane_stream"
EVENTKEY = "backplane_eventkey"


class Store(Protocol):
    """The outbox, the streams and the shard leases of one backend (see the module docstring)."""

    vendor: str
    #: Database work must stay on one thread (SQLite: one writer; its connection is per thread).
    single_thread: bool

    # --- producer side ---------------------------------------------------------------------

    def append(self, tenant_id: uuid.UUID, shard: int, rows: Iterable[EventRow], count: int) -> list[str]:
        """Append ``count`` validated events of one tenant; return their event ids in order.

        ``rows`` (as ``backplane.events.build`` makes them) is consumed once and may raise a
        ``PublishError`` midway: then nothing is written. Raises ``UnknownTenant`` or
        ``InactiveTenant`` (and writes nothing) unless the tenant exists and is active."""
        ...

    def append_one(self, tenant_id: uuid.UUID, shard: int, row: EventRow) -> bool:
        """``append`` of one event (``publish()``); return True when the store rings the
        doorbell for it after the commit itself, False when the caller must."""
        ...

    def append_command(
        self, tenant_id: uuid.UUID, shard: int, stream: str, event_id: str, command: str, body: Mapping[str, Any]
    ) -> None:
        """Append a directed command (``kind = 'command'``) to an edge's stream."""
        ...

    # --- relay side --------------------------------------------------------------------------

    async def aopen_session(self) -> Any:
        """Open the relay's own session (its leases, assignments and marks run on it)."""
        ...

    async def aclose_session(self, session: Any) -> None:
        """Close the session; its shards are free for other relays."""
        ...

    def is_dead(self, session: Any) -> bool:
        """True when the session is gone (its shards may be another relay's by now)."""
        ...

    async def aping(self, session: Any) -> None:
        """Raise unless the session answers."""
        ...

    async def atake_shards(self, session: Any, shards: Sequence[int]) -> list[int]:
        """Try to take ``shards`` for this session; return those taken (held until it closes)."""
        ...

    async def aassign(
        self,
        session: Any,
        shards: Sequence[int],
        limit: int,
        *,
        only_tenant: Any = None,
        skip_tenants: Sequence[Any] = (),
        forwarded: Sequence[Pending] = (),
        floor: ClaimFloor | None = None,
    ) -> list[Pending]:
        """Assign offsets to up to ``limit`` rows of ``shards`` on the relay's session and
        return them in send order; ``forwarded`` (rows sent since the last assignment) are
        marked in the same transaction (if it fails they stay unmarked). ``floor``: the relay's
        claim floor, read and moved by stores whose claim walks assigned rows (PostgreSQL's:
        ``backplane.claims``); others leave it as it is."""
        ...

    async def amark_forwarded(self, session: Any, pending: Sequence[Pending]) -> None:
        """Mark rows forwarded on the relay's session."""
        ...

    def assign(
        self, shards: Sequence[int], limit: int, *, only_tenant: Any = None, skip_tenants: Sequence[Any] = ()
    ) -> list[Pending]:
        """``aassign`` on Django's connection (the same algorithm): tests, tools, benchmarks."""
        ...

    def unforwarded(self, shards: Sequence[int], limit: int, *, skip_tenants: Sequence[Any] = ()) -> list[Pending]:
        """Assigned, unforwarded rows of ``shards`` in send order (what a new owner re-sends)."""
        ...

    def mark_forwarded(self, ids: Sequence[int], parts: Sequence[str | None] | None = None) -> None:
        """Mark rows forwarded on Django's connection (``parts``: each row's ``Pending.part``)."""
        ...

    def pending_tenants(self, shards: Sequence[int]) -> list[Any]:
        """Tenants with unforwarded rows in ``shards`` (the relay's per-tenant fallback)."""
        ...

    def ensure_partitions(self) -> int:
        """Create the outbox partitions due soon, if the backend partitions it; return how many."""
        ...

    # --- edge side ---------------------------------------------------------------------------

    def ensure_streams(self, tenant_id: uuid.UUID, keys: Sequence[str]) -> dict[str, Head]:
        """Return the heads of ``keys``, creating never-seen streams at offset 0 with an epoch."""
        ...

    def open_streams(self, tenants: Mapping[str, uuid.UUID]) -> dict[str, Head]:
        """``ensure_streams`` for streams of any tenants at once (``tenants``: each key's
        tenant), in one statement and one head query: a batch of handshakes."""
        ...

    def stream_heads(self, keys: Sequence[str]) -> dict[str, Head]:
        """Return the current heads of the given streams (missing streams are left out)."""
        ...

    def heads_moved_since(self, since: datetime | None) -> tuple[datetime, dict[str, Head]]:
        """Return the database's clock now and the heads of every stream whose head moved after
        ``since`` (by ``updated_at``; none when ``since`` is None): the edges' head check
        (docs/decisions/0027-head-check-change-feed.md)."""
        ...

    def read_range(self, stream_key: str, after: int, upto: int) -> list[Item]:
        """Return the stream's stored items with ``after < offset <= upto``, in offset order."""
        ...

    # --- maintenance (backplane.retention) -----------------------------------------------------

    #: SQL for "now minus %s seconds" on the database clock (compared with ``created_at``).
    cutoff_sql: str

    def compactor_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Hold the compactor's lock; yield False if another compactor has it."""
        ...

    def summarize_indexes(self) -> None:
        """Bring summarising indexes (BRIN) up to date before compaction reads through them."""
        ...

    def drop_expired_partitions(self, retention_secs: float) -> tuple[int, int, int]:
        """Drop outbox partitions wholly past retention with every row forwarded, raising
        their streams' ``first_retained_offset``; return (rows, payload bytes, partitions)."""
        ...

    def expire_keys(self, retention_secs: float, batch: int) -> int:
        """Delete up to ``batch`` idempotency keys older than the window; return how many."""
        ...

    def reclaim(self, tables: Sequence[str]) -> None:
        """Make the space of rows deleted from ``tables`` reusable (best effort)."""
        ...


def chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
