"""Shard leases: which shards a relay may assign and forward right now.

The store gives them out (``Store.atake_shards``) on the relay's own session: on PostgreSQL
advisory locks (``pg_try_advisory_lock``), so when the process dies (or its session is cut)
PostgreSQL frees them and a standby takes them; on SQLite (embedded: one relay in one process)
every wanted shard is simply owned. The relay runs its assignments on that same session, so a
relay whose session is gone fails its next statement and drops all shards at once, before
another relay can start on them. ``RelayLease`` rows only *report* leases for the admin and
``backplane_status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from channels.db import database_sync_to_async
from django.db import connection
from django.utils import timezone

from backplane.models import RelayLease
from backplane.store import Store, get_store

logger = logging.getLogger(__name__)

# How often a relay tries to take shards it does not hold (standby take-over time).
ACQUIRE_INTERVAL_SECS = 1.0
# How often lease rows are refreshed for status displays.
REPORT_INTERVAL_SECS = 2.0


class Leases:
    """The set of shards this relay may forward right now."""

    def __init__(self, wanted: Sequence[int], holder: str, store: Store | None = None) -> None:
        self.store = store or get_store()
        self.wanted = list(wanted)
        self.holder = holder
        self.owned: set[int] = set()
        self.forwarded: dict[int, int] = {}
        self._conn: Any = None
        self._last_acquire = 0.0
        self._last_report = 0.0
        self._reporting: asyncio.Task[None] | None = None
        self._new_shards = False

    @property
    def conn(self) -> Any:
        """The session holding the shards. The relay runs its statements on it too, so a
        statement that succeeds proves the shards are still held."""
        return self._conn

    async def lost(self, exc: BaseException) -> None:
        """The lock session failed under a statement: drop every shard at once."""
        if self.owned:
            logger.error(
                "relay lost its lease session (%s); dropping shards %s",
                type(exc).__name__,
                sorted(self.owned),
                extra={"action": "lease_lost"},
            )
        self.owned.clear()
        await self._close()

    async def maintain(self) -> list[int]:
        """Take missing shards now and then, and report; no per-call session check."""
        return await self.current(check=False)

    async def current(self, check: bool = True) -> list[int]:
        """Return the shards owned now, after checking the session is alive."""
        if check:
            await self._check_session()
        elif self._conn is not None and self.store.is_dead(self._conn):
            await self.lost(ConnectionError("lease session closed"))
        now = time.monotonic()
        if len(self.owned) < len(self.wanted) and now - self._last_acquire >= ACQUIRE_INTERVAL_SECS:
            self._last_acquire = now
            await self._try_acquire()
        await self._report()
        return sorted(self.owned)

    async def _check_session(self) -> None:
        if self._conn is None:
            return
        try:
            await self.store.aping(self._conn)
        except Exception as exc:
            await self.lost(exc)

    async def _try_acquire(self) -> None:
        try:
            if self._conn is None:
                self._conn = await self.store.aopen_session()
            got = await self.store.atake_shards(self._conn, [s for s in self.wanted if s not in self.owned])
        except Exception as exc:
            logger.warning("relay could not take leases: %s", type(exc).__name__, extra={"action": "lease_error"})
            self.owned.clear()
            await self._close()
            return
        if got:
            self.owned.update(got)
            self._new_shards = True
            logger.info("relay %s took shards %s", self.holder, got, extra={"action": "lease_acquired"})
            await self._report(force=True, acquired=got)

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a dead session frees its locks anyway
                await self.store.aclose_session(self._conn)
            self._conn = None

    async def release(self) -> None:
        """Give every shard back (clean shutdown)."""
        await self._report_done()
        await self._close()
        owned, self.owned = sorted(self.owned), set()
        if owned:
            await database_sync_to_async(_clear_rows)(owned, self.holder)

    def took_new_shards(self) -> bool:
        """True once after shards were acquired (their leftovers need re-sending)."""
        new, self._new_shards = self._new_shards, False
        return new

    def count(self, per_shard: dict[int, int]) -> None:
        for shard, n in per_shard.items():
            self.forwarded[shard] = self.forwarded.get(shard, 0) + n

    async def _report(self, force: bool = False, acquired: Sequence[int] = ()) -> None:
        """Refresh the status rows: now when ``force`` (shards taken), else every
        REPORT_INTERVAL_SECS in the background — a cycle never waits for them
        (docs/decisions/0015-relay-status-rows-off-the-cycle.md)."""
        now = time.monotonic()
        if not force:
            busy = self._reporting is not None and not self._reporting.done()
            if busy or now - self._last_report < REPORT_INTERVAL_SECS:
                return
            self._last_report = now
            self._reporting = asyncio.create_task(self._write(()))
            return
        self._last_report = now
        await self._report_done()  # rows are written in order
        await self._write(acquired)

    async def _report_done(self) -> None:
        if self._reporting is not None:
            with contextlib.suppress(Exception):
                await self._reporting
            self._reporting = None

    async def _write(self, acquired: Sequence[int]) -> None:
        counts, self.forwarded = self.forwarded, {}
        try:
            await database_sync_to_async(_write_rows)(sorted(self.owned), self.holder, counts, list(acquired))
        except Exception as exc:  # reporting must not stop forwarding
            logger.warning("could not record relay leases: %s", type(exc).__name__, extra={"action": "lease_report"})


def _write_rows(owned: list[int], holder: str, counts: dict[int, int], acquired: list[int]) -> None:
    """Upsert every owned shard's status row in one statement (it runs beside the relay's
    cycles: docs/decisions/0015-relay-status-rows-off-the-cycle.md). A row changes
    ``acquired_at`` when its holder changes or the shard was just taken; ``forwarded_total``
    grows by what was forwarded since the last report."""
    if not owned:
        return
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    table = RelayLease._meta.db_table
    rows: list[Any] = []
    for shard in owned:
        n = counts.get(shard, 0)
        rows += [shard, holder, now, now, n, now if n else None]
    taken = f"rl.shard IN ({', '.join(['%s'] * len(acquired))})" if acquired else "FALSE"
    with connection.cursor() as cur:
        cur.execute(
            f"INSERT INTO {table} AS rl (shard, holder, acquired_at, heartbeat_at, forwarded_total, "
            f"last_forwarded_at) VALUES {', '.join(['(%s, %s, %s, %s, %s, %s)'] * len(owned))} "
            f"ON CONFLICT (shard) DO UPDATE SET holder = excluded.holder, heartbeat_at = excluded.heartbeat_at, "
            f"acquired_at = CASE WHEN rl.holder <> excluded.holder OR {taken} THEN excluded.acquired_at "
            f"ELSE rl.acquired_at END, forwarded_total = rl.forwarded_total + excluded.forwarded_total, "
            f"last_forwarded_at = coalesce(excluded.last_forwarded_at, rl.last_forwarded_at)",
            [*rows, *acquired],
        )


def _clear_rows(shards: list[int], holder: str) -> None:
    RelayLease.objects.filter(shard__in=shards, holder=holder).update(holder="", heartbeat_at=timezone.now())
