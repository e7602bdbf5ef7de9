"""The relay: forward committed outbox rows to their stream groups, at least once.

Each cycle, for the shards this relay leases: assign offsets to committed rows that have
none (one transaction), send every assigned-but-unforwarded row to its stream's group
(one ``group_send`` per stream per cycle, chunked), then mark them forwarded. A crash
between any two steps re-sends the same rows with the same offsets on the next cycle;
edges drop the repeats by offset, peers by event id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from channels.db import database_sync_to_async
from django.db import DatabaseError

from backplane import commands as command_routing
from backplane import hoptrace, httpd, metrics, streams
from backplane.claims import ClaimFloor
from backplane.conf import conf
from backplane.doorbell import Listener
from backplane.leases import Leases
from backplane.store import Pending, Store, get_store
from backplane.vendor.channels_redis import PubSubPublisher

logger = logging.getLogger(__name__)

# Events per group message: keeps one message well under Redis/msgpack comfort sizes.
MAX_ITEMS_PER_MESSAGE = 250
# Back-off after a failing cycle (database or Redis down), doubling up to the cap.
ERROR_BACKOFF_SECS = 0.2
ERROR_BACKOFF_MAX_SECS = 5.0
# How often a relay re-sends whatever is assigned but unforwarded in its shards, whatever
# the reason it was left (belt and braces: starts, take-overs and failures already do).
RESEND_SWEEP_SECS = 5.0
# Longest a cycle waits for the transport to take its messages before giving up (they stay
# unforwarded and go again; edges fill from the outbox meanwhile).
SEND_TIMEOUT_SECS = 2.0
# ...plus this much per byte sent (a conservative floor for loopback-to-LAN Redis).
SEND_BYTES_PER_SEC = 5_000_000
# Streams sent at once per cycle (each may hold one Redis connection from the pool).
SEND_CONCURRENCY = 32
# A tenant whose rows make assignment fail is set aside this long, then retried.
QUARANTINE_SECS = 30.0
# How often a relay makes sure outbox partitions exist ahead (cheap when they do).
PARTITION_CHECK_SECS = 600.0
# Rows sent are marked forwarded inside the next assignment's transaction (no round trip of
# their own per cycle); when no assignment comes within this long, on their own: at low rates
# in the relay's idle time, so the next event's assignment carries no marks (e2e p50 -6 % at
# 500 ev/s, -12 % at 2000: docs/decisions/0052-marks-in-the-idle-time.md).
MARK_LINGER_SECS = 0.001


def _failpoint(name: str) -> None:
    """Die here when ``BACKPLANE_FAILPOINT`` names this point (fault tests only)."""
    if os.environ.get("BACKPLANE_FAILPOINT") == name:
        logger.warning("failpoint %s: killing relay", name, extra={"action": "failpoint"})
        os.kill(os.getpid(), signal.SIGKILL)


class Relay:
    """One relay process's forwarding loop. I/O is passed in: ``layer`` is a channel layer,
    ``store`` the database (``backplane.store``; by default the configured database's)."""

    def __init__(
        self,
        layer: Any,
        store: Store | None = None,
        *,
        shards: Sequence[int] | None = None,
        batch_size: int | None = None,
        poll_interval: float | None = None,
        holder: str | None = None,
    ) -> None:
        self.layer = layer
        self.store = store or get_store()
        self.batch_size = batch_size or conf.RELAY_BATCH_SIZE
        self.poll_interval = poll_interval if poll_interval is not None else conf.RELAY_POLL_INTERVAL_SECS
        wanted = list(shards) if shards is not None else list(range(conf.SHARDS))
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.leases = Leases(wanted, self.holder, self.store)
        self.forwarded_total = 0
        self.assigned_total = 0
        self.quarantine: dict[Any, float] = {}
        # Where the claim's index scan starts (backplane.claims); per-tenant retries claim without it.
        self.claim_floor = ClaimFloor()
        # True until a cycle has swept up everything assigned-but-unforwarded (at start,
        # after a crash of a previous relay, and after any failed send).
        self.resend_needed = True
        self.next_sweep = 0.0
        # The pub/sub layer's pipelined publisher; False for layers without one; None: not made yet.
        self._publisher: PubSubPublisher | bool | None = None
        # Rows sent but not yet marked forwarded (see MARK_LINGER_SECS).
        self.unmarked: list[Pending] = []
        # For /metrics, in plain numbers (metrics.py reads them when scraped).
        self.cycle_seconds = metrics.Histogram(metrics.CYCLE_BUCKETS_SECS)
        self.wakes = 0
        self.polls = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.backlog: dict[str, Any] | None = None  # read by the HTTP port before a scrape
        # bench/hop_trace.py: the step times of the cycle in progress, and the last doorbell ring.
        self.trace: dict[str, float] = {}
        self.bell: Listener | None = None  # the run loop's doorbell
        self.runq_at = 0.0
        # The run loop's send in flight: the next cycle's assignment runs meanwhile, and that
        # cycle waits for it before sending anything itself (docs/decisions/0035).
        self._sending: asyncio.Task[int] | None = None

    async def aclose(self) -> None:
        """Record what was sent, release the shards and close this relay's connections."""
        with contextlib.suppress(Exception):  # unmarked rows are sent again by the next owner
            await self._collect()
        with contextlib.suppress(Exception):
            await self.flush_marks()
        if isinstance(self._publisher, PubSubPublisher):
            with contextlib.suppress(Exception):
                await self._publisher.aclose()
        self._publisher = None
        await self.leases.release()

    async def cycle(self, *, overlap: bool = False) -> tuple[int, int]:
        """Run one cycle; return (rows assigned, rows forwarded).

        With ``overlap`` (the run loop), when a next cycle is due (a ring is waiting or the
        batch was full), the cycle's send is left running and the count is of the rows handed
        to it: the next cycle's assignment goes to PostgreSQL meanwhile, and that cycle waits
        for the send before it sends (or sweeps) anything, so each stream's messages still
        leave in offset order, one send at a time (docs/decisions/0035)."""
        # The assignment runs on the lease session itself: if that session died, the statement
        # fails and the relay drops its shards before sending anything, so it stops before
        # another relay can take them over.
        began = time.time() if hoptrace.ON else 0.0
        # The last ring before this cycle began (bench/hop_trace.py: the relay's wake-up).
        woken = self.bell.rang_at if hoptrace.ON and self.bell is not None else 0.0
        rung = self.bell.rung_at if hoptrace.ON and self.bell is not None else 0.0
        lag = runq_since = 0.0  # the loop's lateness and the time off the CPU since the last cycle
        if hoptrace.ON:
            runq = hoptrace.runq_wait()
            lag, runq_since, self.runq_at = hoptrace.take_lag(), runq - self.runq_at, runq
        owned = await self.leases.maintain()
        if not owned:
            with contextlib.suppress(Exception):  # its rows are sent again by the shards' next owner
                await self._collect()
            self.unmarked = []  # the shards' next owner sends them again
            return 0, 0
        now = time.monotonic()
        if self.leases.took_new_shards() or now >= self.next_sweep:
            # Shards just taken may hold rows a dead relay assigned but never forwarded; and a
            # periodic sweep catches anything else left unforwarded.
            self.resend_needed = True
            self.next_sweep = now + RESEND_SWEEP_SECS
        self.quarantine = {t: until for t, until in self.quarantine.items() if until > now}
        skip = list(self.quarantine)
        # The marks go with this assignment; a send still in flight adds its rows for the next.
        carried, self.unmarked = self.unmarked, []
        marks = len(carried)  # rows whose forwarded marks this cycle's assignment carries
        try:
            fresh = await self.store.aassign(
                self.leases.conn, owned, self.batch_size, skip_tenants=skip, forwarded=carried, floor=self.claim_floor
            )
            assigned = len(fresh)
        except (DatabaseError, psycopg.Error) as exc:
            self.unmarked = carried + self.unmarked
            self.errors["assign"] += 1
            with contextlib.suppress(Exception):  # a failed send is swept up below
                await self._collect()
            if self.store.is_dead(self.leases.conn):
                await self._lose(exc)
                return 0, 0
            # The failed transaction took the last cycle's marks with it: write them now, or
            # the sweep below would send those rows again.
            await self.flush_marks()
            # One tenant's rows must not stop the others: assign tenant by tenant and set
            # aside (for QUARANTINE_SECS) the ones that still fail.
            logger.error(
                "relay assignment failed (%s); retrying tenant by tenant",
                type(exc).__name__,
                extra={"action": "relay_assign_error"},
            )
            assigned = await self._assign_per_tenant(owned)
            fresh = []
            self.resend_needed = True
            if not self.leases.owned:
                return 0, 0  # the session died meanwhile: nothing is sent without it
        if assigned:
            _failpoint("after_assign")
        # The previous cycle's send first: its failures are swept up with this cycle's rows.
        await self._collect()
        if self.resend_needed:
            # After a start, a take-over or a failure: everything assigned and not yet
            # forwarded goes again, with the same offsets. The rows sent since the last
            # assignment are marked first: else the sweep would read them as left behind and,
            # with the send overlapped, find its batch full of them every cycle
            # (docs/decisions/0035).
            await self.flush_marks()
            pending = await database_sync_to_async(self.store.unforwarded)(
                owned, self.batch_size, skip_tenants=list(self.quarantine)
            )
            # Sweep again next cycle only if this one was full of rows left from before: the
            # rows just assigned are unforwarded too, and in a backlog they alone fill the
            # batch (else a backlog's rows would be read twice).
            fresh_ids = {p.id for p in fresh}
            more = len(pending) >= self.batch_size and any(p.id not in fresh_ids for p in pending)
        else:
            pending, more = fresh, False
        if not pending:
            self.resend_needed = more
            self.assigned_total += assigned
            return assigned, 0
        self.resend_needed = True  # until the send is under way: an exception leaves it set
        commands = [p for p in pending if p.kind == "command"]
        not_sent: set[int] = set()
        if commands:  # a command for a dead edge is re-routed or recorded, never sent into the void
            not_sent = await database_sync_to_async(command_routing.route)(commands)
        # Bounded: a hung Redis must not stop assignment (edges fill from the outbox meanwhile).
        to_send = [p for p in pending if p.id not in not_sent]
        # Bounded, but by size too: a big batch of big payloads must not time out every cycle.
        timeout = SEND_TIMEOUT_SECS + sum(len(p.item.payload_json) for p in to_send) / SEND_BYTES_PER_SEC
        trace: dict[str, Any] = {}
        if hoptrace.ON:
            trace = self.trace = {
                "rung": rung,
                "woken": woken,
                "cycle": began,
                "assigned": time.time(),
                "marks": marks,
                "statements_done": getattr(self.store, "statements_done_at", 0.0),
                "lag_ms": lag * 1000,
                "runq_ms": runq_since * 1000,
            }
        self.assigned_total += assigned
        self.resend_needed = more  # the send sets it again if it fails (collected before any sweep)
        # Overlapped only when a next cycle is due (a ring came meanwhile, or the batch was
        # full); else awaited here, without the loop turn a task's start takes.
        bell = self.bell
        if overlap and (assigned >= self.batch_size or (bell is not None and bell.waiting())):
            self._sending = asyncio.ensure_future(self._send_and_record(pending, to_send, timeout, trace))
            return assigned, len(pending)
        return assigned, await self._send_and_record(pending, to_send, timeout, trace)

    async def _send_and_record(
        self, pending: Sequence[Pending], to_send: Sequence[Pending], timeout: float, trace: dict[str, Any]
    ) -> int:
        """Send a cycle's rows; the ones that went are marked with a later assignment."""
        try:
            async with asyncio.timeout(timeout):  # no task of its own: the send starts in this loop turn
                failed = await self._send(to_send, trace)
        except BaseException:
            self.resend_needed = True  # nothing of it is marked: the next sweep sends it all again
            raise
        if hoptrace.ON:
            trace["published"] = time.time()
            rows = [(p.stream, p.item.offset) for p in to_send if p.kind != "command"]
            hoptrace.record("relay", trace, rows)
        _failpoint("before_mark")
        done = [p for p in pending if p.id not in failed]
        self.unmarked += done  # marked with the next assignment, or by flush_marks()
        if failed:
            self.resend_needed = True
        per_shard: dict[int, int] = {}
        for p in done:
            per_shard[p.shard] = per_shard.get(p.shard, 0) + 1
        self.leases.count(per_shard)
        self.forwarded_total += len(done)
        return len(done)

    async def _collect(self) -> int:
        """Wait for the send in flight, if any; return how many of its rows went (raises what
        the send raised)."""
        task, self._sending = self._sending, None
        return 0 if task is None else await task

    async def flush_marks(self) -> None:
        """Mark the rows sent since the last assignment forwarded, now."""
        if not self.unmarked or self.leases.conn is None:
            return
        try:
            await self.store.amark_forwarded(self.leases.conn, self.unmarked)
        except psycopg.Error as exc:
            await self._lose(exc)
            raise
        self.unmarked = []

    async def _lose(self, exc: BaseException) -> None:
        """The lease session failed: drop the shards, and the rows sent but not marked (their
        next owner sends them again, with the same offsets)."""
        await self.leases.lost(exc)
        self.unmarked = []

    async def _assign_per_tenant(self, owned: Sequence[int]) -> int:
        total = 0
        for tenant_id in await database_sync_to_async(self.store.pending_tenants)(owned):
            if self.store.is_dead(self.leases.conn):
                break  # nothing is assigned without the session that holds the shards
            try:
                total += len(await self.store.aassign(self.leases.conn, owned, self.batch_size, only_tenant=tenant_id))
            except (DatabaseError, psycopg.Error) as exc:
                if self.store.is_dead(self.leases.conn):
                    await self._lose(exc)  # the session, not the tenant: stop here
                    break
                self.quarantine[tenant_id] = time.monotonic() + QUARANTINE_SECS
                self.errors["tenant_quarantined"] += 1
                logger.error(
                    "relay sets tenant %s aside for %ss: %s",
                    tenant_id,
                    QUARANTINE_SECS,
                    type(exc).__name__,
                    extra={"action": "tenant_quarantined"},
                )
        return total

    async def _send(self, pending: Sequence[Pending], trace: dict[str, Any]) -> set[int]:
        """Send rows to their groups, streams side by side; return the ids that failed.

        Streams are independent, so their sends overlap (up to SEND_CONCURRENCY at once);
        within a stream the chunks go in offset order. A stream whose send fails stays
        unforwarded (it is sent again next cycle); the others go on, so one tenant's failure
        does not hold up the rest.
        """
        prefix = conf.channel_prefix
        by_stream: dict[str, list[Pending]] = {}
        for p in pending:
            by_stream.setdefault(p.stream, []).append(p)
        if self._publisher is None:
            self._publisher = PubSubPublisher.for_layer(self.layer, conf.redis_url, SEND_TIMEOUT_SECS) or False
        if isinstance(self._publisher, PubSubPublisher):
            # One pipelined round trip for every group message of the cycle. A command that
            # reached no subscriber (its edge is re-subscribing) is not forwarded: it goes
            # again, and is re-routed if its edge is dead by then.
            messages: list[tuple[str, dict[str, Any]]] = []
            owners: list[list[Pending]] = []
            for key, rows in by_stream.items():
                for group, message in _messages(prefix, key, rows):
                    messages.append((group, message))
                    owners.append(rows if message["type"] == "bp.command" else [])
            if hoptrace.ON:
                trace["rendered"] = time.time()
            receivers = await self._publisher.publish_all(messages)
            unheard: set[int] = set()
            for rows, count in zip(owners, receivers, strict=True):
                if rows and not count:
                    unheard.update(p.id for p in rows)
            return unheard
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(key: str, rows: list[Pending]) -> BaseException | None:
            async with gate:
                try:
                    await self._send_stream(prefix, key, rows)
                    return None
                except Exception as exc:
                    return exc

        outcomes = await asyncio.gather(*(one(key, rows) for key, rows in by_stream.items()))
        failed: set[int] = set()
        errors = [exc for exc in outcomes if exc is not None]
        if errors and len(errors) == len(by_stream):  # everything failed: the transport is down
            raise errors[0]
        for (_key, rows), exc in zip(by_stream.items(), outcomes, strict=True):
            if exc is not None:
                failed.update(p.id for p in rows)
                self.errors["send"] += 1
                logger.error(
                    "relay could not send stream of tenant %s: %s",
                    rows[0].tenant_id,
                    type(exc).__name__,
                    extra={"action": "relay_send_error"},
                )
        return failed

    async def _send_stream(self, prefix: str, key: str, rows: Sequence[Pending]) -> None:
        for group, message in _messages(prefix, key, rows):
            await self.layer.group_send(group, message)

    async def run(self, stop: asyncio.Event | None = None, *, once: bool = False) -> None:
        """Forward until ``stop`` is set (or one pass when ``once``)."""
        stop = stop or asyncio.Event()
        backoff = ERROR_BACKOFF_SECS
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop or asyncio
        logger.info(
            "relay %s starting for %d shards on %s",
            self.holder,
            len(self.leases.wanted),
            loop,
            extra={"action": "relay_start", "loop": loop},
        )
        metrics.install()
        metrics.relays.append(self)
        async with Listener() as bell:
            self.bell = bell  # cycle() asks it whether a ring is waiting
            if hoptrace.ON:
                hoptrace.start_flusher("relay")
                hoptrace.start_lag_probe()
                self.runq_at = hoptrace.runq_wait()
            stopping = asyncio.ensure_future(_interrupt_on_stop(bell, stop))  # cancelled in the finally below
            next_partition_check = 0.0
            try:
                while not stop.is_set():
                    try:
                        if time.monotonic() >= next_partition_check and self.leases.owned:
                            next_partition_check = time.monotonic() + PARTITION_CHECK_SECS
                            await database_sync_to_async(self.store.ensure_partitions)()
                        began = time.perf_counter()
                        assigned, forwarded = await self.cycle(overlap=True)
                        self.cycle_seconds.observe(time.perf_counter() - began)
                        backoff = ERROR_BACKOFF_SECS
                    except Exception as exc:
                        self.errors[type(exc).__name__] += 1
                        logger.error(
                            "relay cycle failed: %s: %s",
                            type(exc).__name__,
                            _safe(exc),
                            extra={"action": "relay_error"},
                        )
                        await _sleep_or_stop(stop, backoff)
                        backoff = min(backoff * 2, ERROR_BACKOFF_MAX_SECS)
                        continue
                    if once and assigned < self.batch_size and forwarded < self.batch_size:
                        break
                    if assigned >= self.batch_size or forwarded >= self.batch_size:
                        continue  # more is waiting: no sleep
                    if self.unmarked or self._sending is not None:
                        # The next assignment carries the marks if it comes soon; else now.
                        if await _rang_or_stopped(bell, stop, MARK_LINGER_SECS):
                            continue
                        try:
                            await self._collect()
                            await self.flush_marks()
                        except Exception as exc:
                            self.errors["mark"] += 1
                            logger.error(
                                "relay could not send or mark rows: %s",
                                type(exc).__name__,
                                extra={"action": "relay_error"},
                            )
                    if await _rang_or_stopped(bell, stop, self.poll_interval):
                        self.wakes += 1
                    else:
                        self.polls += 1
            finally:
                stopping.cancel()
                with contextlib.suppress(ValueError):
                    metrics.relays.remove(self)
                await self.aclose()
                logger.info(
                    "relay %s stopped after forwarding %d",
                    self.holder,
                    self.forwarded_total,
                    extra={"action": "relay_stop"},
                )


def _messages(prefix: str, key: str, rows: Sequence[Pending]) -> list[tuple[str, dict[str, Any]]]:
    """The group messages carrying one stream's rows (commands one by one, events in chunks)."""
    audience = streams.audience_of(key)
    if audience == "edge":
        group = streams.edge_group(prefix, key[2:])
        # The target edge named in the message: a command replayed onto another edge's group
        # is refused there (EdgeRuntime checks it; messages without it are accepted).
        return [(group, {"type": "bp.command", "edge": key[2:], "body": p.item.payload_json}) for p in rows]
    group = streams.group_name(prefix, key)
    epoch = rows[0].epoch
    out = []
    for start in range(0, len(rows), MAX_ITEMS_PER_MESSAGE):
        chunk = rows[start : start + MAX_ITEMS_PER_MESSAGE]
        items = [[p.item.offset, streams.event_frame(audience, epoch, p.item)] for p in chunk]
        out.append((group, {"type": "bp.batch", "stream": key, "epoch": epoch, "items": items}))
    return out


def _safe(exc: Exception) -> str:
    # Driver messages may quote SQL parameters (payloads); keep the first line, capped.
    return str(exc).splitlines()[0][:200] if str(exc) else ""


async def _rang_or_stopped(bell: Listener, stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for the doorbell or ``stop``; True if either came. ``stop``
    interrupts the bell (``_interrupt_on_stop``), so the wait is the bell's alone: no tasks to
    start and cancel per wait, and a ring wakes the relay in one loop turn."""
    if stop.is_set():
        return True
    rang = await bell.wait(seconds)
    return stop.is_set() or rang


async def _interrupt_on_stop(bell: Listener, stop: asyncio.Event) -> None:
    await stop.wait()
    bell.interrupt()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def install_signal_handlers(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM/SIGINT so the loop finishes its cycle and releases leases."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_until_signal(layer: Any, **kwargs: Any) -> Relay:
    """Run a relay until SIGTERM/SIGINT (or ``once``); return it for its counters. With
    ``http_port``, answer /metrics, /livez and /readyz on it meanwhile (``httpd``)."""
    once = kwargs.pop("once", False)
    http_port = kwargs.pop("http_port", None)
    http_host = kwargs.pop("http_host", "0.0.0.0")  # noqa: S104  (scraped from other hosts)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    relay = Relay(layer, **kwargs)
    started = time.monotonic()
    server = await httpd.serve(relay, http_port, http_host) if http_port is not None else None
    try:
        await relay.run(stop, once=once)
    finally:
        if server is not None:
            server.close()
    logger.info("relay ran %.1fs", time.monotonic() - started, extra={"action": "relay_exit"})
    return relay
