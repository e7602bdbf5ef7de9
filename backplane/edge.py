"""The edge runtime: one per ASGI process (event loop).

It registers the edge, heartbeats its directory rows, receives directed commands on
``bp.<prefix>.edge.<edge_id>``, re-checks its sockets' tokens, and compares the heads of its
connected streams with what its peers got, so a lost trailing message is filled from the
outbox within about a second.

It also does the edge's fan-out: one channel of the runtime joins the group of every stream
one of its sockets belongs to (once, however many sockets share the stream), and each batch
that arrives is handed to those sockets in one pass. A tenant-wide event is one Redis message
per edge, not one per socket, and no socket needs a task, a channel or a thread hop of its own
to receive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from backplane import auth, directory, hoptrace, metrics, streams
from backplane.conf import conf, edge_id
from backplane.protocol import Close
from backplane.store import Head, Store, get_store
from backplane.vendor import channels as vendor_channels
from backplane.vendor import channels_redis as vendor_redis
from backplane.vendor import daphne as vendor_daphne


class Subscriber(Protocol):
    """What the runtime needs of a socket (``consumers.GatewayConsumer`` is one)."""

    connection_id: str
    principal: auth.Principal
    keys: dict[str, str]  # stream name on the wire -> stream key

    def offer(
        self, key: str, name: str, epoch: str, items: list[list[Any]], offsets: Sequence[int], wire: list[bytes]
    ) -> Awaitable[None] | None:
        """Take a relay batch of one of its streams (frames and offsets built once per batch);
        return what is left to await, if anything (the fast path returns None: a fan-out
        makes no coroutine per socket)."""

    async def observe_heads(self, heads: dict[str, Any]) -> bool | None:
        """Compare the heads of its streams (by key) with what its peer got; true when the
        next head check must look at it again, whether or not a head moves (a lag seen once,
        live events held, no cursors yet)."""

    async def close_with(self, code: int) -> None:
        """Close the socket with ``code`` (idempotent)."""

    def directory_row(self) -> dict[str, Any]:
        """Its ``Connection`` row's fields."""

    def positions(self, heads: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """Per stream name: the last offset its peer got, and how far behind ``heads`` that is."""


logger = logging.getLogger(__name__)

# Largest number of stream keys in one head query (docs/decisions/0021-head-check.md).
HEAD_QUERY_CHUNK = 1000
# After closing every socket on shutdown, wait this long for the close frames to go out.
DRAIN_FLUSH_SECS = 0.5
# Messages from Redis that cannot be decrypted are logged at most this often (a forger
# could send thousands a second).
REJECTED_LOG_INTERVAL_SECS = 10.0
# The heartbeat's and the head check's walks over the sockets hand the loop back after this
# many: at 20 000 sockets one walk in one turn held every delivery 30–70 ms (0040).
SOCKETS_PER_TURN = 500


class EdgeRuntime:
    _by_loop: dict[asyncio.AbstractEventLoop, EdgeRuntime] = {}

    def __init__(self, edge_id: str, layer: Any = None, store: Store | None = None) -> None:
        self.edge_id = edge_id
        # I/O passed in (the process's channel layer and store by default).
        self.layer: Any = layer if layer is not None else get_channel_layer()  # channels-redis ships no types
        self.store = store if store is not None else get_store()
        self.consumers: dict[str, Subscriber] = {}
        # The live sockets' credentials for the heartbeat's auth.recheck, kept until a socket
        # comes or goes: the same frozensets, so recheck reuses their JSON text (0033).
        self.credentials: tuple[frozenset[Any], frozenset[Any]] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.channel: str | None = None
        # Fan-out: the runtime's delivery channel, the sockets of each stream, and the stream
        # groups it joined (or is joining) and is leaving.
        self.stream_channel = ""
        self.members: dict[str, dict[Subscriber, None]] = {}
        self.joins: dict[str, asyncio.Future[None]] = {}
        self.leaving: dict[str, asyncio.Future[None]] = {}
        self._to_join: list[tuple[str, asyncio.Future[None]]] = []  # groups to join this loop turn
        self.draining = False
        # The heads of the streams its sockets belong to (by stream key), as the head checks
        # read them: the heartbeat measures each socket's lag against them, with no query of
        # its own. A check reads only the heads that moved since the last one (by the
        # database's clock, ``feed_since``), every HEAD_SWEEP_INTERVAL_SECS all of them.
        self.last_heads: dict[str, Head] = {}
        self.feed_since: datetime | None = None
        self.next_sweep = float("-inf")
        self.unseen: dict[Subscriber, None] = {}  # added since the last check
        self.watch: dict[Subscriber, None] = {}  # to observe again at the next check
        # The heartbeat's positions: as the last beat wrote them; the sockets that may have
        # moved since (a batch, a head that moved, a lag, just added); the lag histogram kept
        # up to date with them.
        self.last_positions: dict[str, dict[str, list[int]]] = {}
        self.stirred: dict[Subscriber, None] = {}
        self.lagging: dict[Subscriber, None] = {}  # behind (or with no position) at the last beat
        self.lag = metrics.Histogram(metrics.LAG_BUCKETS_EVENTS)
        # Messages from Redis dropped unread (forged, another deployment's key, too old),
        # for a metrics exporter; and the rate limit of their log line.
        self.rejected = 0
        self._rejected_logged = 0
        self._rejected_log_at = float("-inf")
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def get(cls, port: int | None = None) -> EdgeRuntime:
        """Return this loop's runtime, starting it on first use (again after a failed start)."""
        loop = asyncio.get_running_loop()
        runtime = cls._by_loop.get(loop)
        if runtime is None:
            runtime = cls(edge_id(port))
            cls._by_loop[loop] = runtime
            try:
                await runtime.start()
            except BaseException as exc:
                cls._by_loop.pop(loop, None)
                runtime._started.set_exception(exc)
                runtime._started.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            runtime._started.set_result(None)
        await asyncio.shield(runtime._started)
        return runtime

    async def start(self) -> None:
        if not streams.EDGE_ID_RE.match(self.edge_id):
            raise ValueError(f"malformed EDGE_ID {self.edge_id!r}")
        await database_sync_to_async(directory.start_edge)(self.edge_id)
        # The default prefix, like the consumers' channels: the core layer receives every
        # channel of one prefix through one BRPOP loop, and a second prefix would take turns
        # with it (delaying every socket's messages by up to the BRPOP timeout).
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(streams.edge_group(conf.channel_prefix, self.edge_id), self.channel)
        self.stream_channel = await self.layer.new_channel()
        if hoptrace.ON:
            hoptrace.install_layer_probes(self.layer, self.stream_channel)
            hoptrace.start_flusher("edge")
        self.tasks = [
            asyncio.create_task(self._batches()),
            asyncio.create_task(self._commands()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._head_check()),
        ]
        _install_sigterm(self)
        metrics.install()
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop or asyncio
        logger.info("edge %s started on %s", self.edge_id, loop, extra={"action": "edge_start", "loop": loop})

    async def drain(self, code: int = Close.RECONNECT) -> int:
        """Stop accepting, close every socket with ``code``, remove this edge's directory rows."""
        self.draining = True
        closing = list(self.consumers.values())
        for c in closing:
            await c.close_with(code)
        try:
            await database_sync_to_async(directory.unregister_edge)(self.edge_id)
        except Exception as exc:  # the sweep removes the rows once the TTL passes
            logger.warning("could not remove edge rows: %s", type(exc).__name__, extra={"action": "drain_error"})
        logger.info("edge %s drained %d sockets", self.edge_id, len(closing), extra={"action": "drained"})
        return len(closing)

    async def shutdown(self) -> None:
        """SIGTERM: drain with 4001 so peers reconnect elsewhere and resume, then exit."""
        await self.drain(Close.RECONNECT)
        await asyncio.sleep(DRAIN_FLUSH_SECS)  # let the close frames reach the peers
        for task in self.tasks:
            task.cancel()
        if not vendor_daphne.stop_reactor():
            os._exit(0)

    def add(self, consumer: Subscriber) -> None:
        self.consumers[consumer.connection_id] = consumer
        self.credentials = None
        self.unseen[consumer] = None
        self.stirred[consumer] = None

    def remove(self, consumer: Subscriber) -> None:
        self.consumers.pop(consumer.connection_id, None)
        self.credentials = None
        self.unseen.pop(consumer, None)
        self.watch.pop(consumer, None)
        self.stirred.pop(consumer, None)
        self.lagging.pop(consumer, None)
        for lags in self.last_positions.pop(consumer.connection_id, {}).values():
            self.lag.forget(lags[1])

    # --- fan-out: one subscription per stream, batches handed to every socket of it ------

    async def subscribe(self, consumer: Subscriber) -> None:
        """Make ``consumer`` receive its streams' batches; return once the edge is in every
        one of their groups (so what is committed after this is not missed)."""
        keys = list(consumer.keys.values())
        for key in keys:
            self.members.setdefault(key, {})[consumer] = None
        for key in keys:
            await self._join(key)

    def unsubscribe(self, consumer: Subscriber) -> None:
        """Stop handing batches to ``consumer`` (idempotent). Groups no socket needs any more
        are left by the next heartbeat, so a reconnect storm does not churn subscriptions."""
        for key in consumer.keys.values():
            sockets = self.members.get(key)
            if sockets is not None:
                sockets.pop(consumer, None)
                if not sockets:
                    del self.members[key]
                    self.last_heads.pop(key, None)  # not kept up to date once no socket needs it

    async def _join(self, key: str) -> None:
        joined = self.joins.get(key)
        if joined is not None and joined.done() and not joined.cancelled() and joined.exception() is None:
            return  # joined already (no leave in flight: a leave drops the join first): most sockets
        leaving = self.leaving.get(key)
        if leaving is not None:  # never let a late group_discard undo this join
            await asyncio.shield(leaving)
        joined = self.joins.get(key)
        if joined is None:
            group = streams.group_name(conf.channel_prefix, key)
            joined = self.joins[key] = self._group_add_soon(group)
        try:
            await asyncio.shield(joined)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self.joins.get(key) is joined:  # the next socket of this stream tries again
                del self.joins[key]
            raise

    def _group_add_soon(self, group: str) -> asyncio.Future[None]:
        """Join ``group`` with the others asked for in this loop turn, in one call
        (``vendor.channels.group_add_many``: one SUBSCRIBE on the pub/sub layer)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._to_join:
            loop.call_soon(self._join_batch)
        self._to_join.append((group, done))
        return done

    def _join_batch(self) -> None:
        batch, self._to_join = self._to_join, []
        task = asyncio.ensure_future(
            vendor_channels.group_add_many(self.layer, [group for group, _ in batch], self.stream_channel)
        )

        def answer(task: asyncio.Future[None]) -> None:
            exc = None if task.cancelled() else task.exception()
            for _, done in batch:
                if done.done():
                    continue
                if task.cancelled():
                    done.cancel()
                elif exc is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(None)

        task.add_done_callback(answer)

    async def leave_idle_groups(self) -> int:
        """Leave the groups of streams no socket of this edge belongs to any more."""
        idle = [(key, joined) for key, joined in self.joins.items() if key not in self.members and joined.done()]
        left = 0
        for key, joined in idle:
            # Checked again for each key: the leaves before it awaited, and a socket of this
            # stream may have subscribed meanwhile (finding the group joined, it did not wait).
            if key in self.members or self.joins.get(key) is not joined:
                continue
            del self.joins[key]
            left += 1
            group = streams.group_name(conf.channel_prefix, key)
            leaving = self.leaving[key] = asyncio.ensure_future(self.layer.group_discard(group, self.stream_channel))
            try:
                await asyncio.shield(leaving)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the layer forgets it after group_expiry; batches for it are ignored
                logger.warning("could not leave a group: %s", type(exc).__name__, extra={"action": "group_leave"})
            finally:
                if self.leaving.get(key) is leaving:
                    del self.leaving[key]
        return left

    async def _batches(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.stream_channel)
            except asyncio.CancelledError:
                raise
            except vendor_redis.UNREADABLE as exc:  # dropped before it reaches a socket or a cursor
                if hoptrace.ON:
                    hoptrace.read_time(self.stream_channel)
                self.reject(type(exc).__name__)
                continue
            except Exception as exc:  # a lost message is filled by the sockets' gap fill / head check
                logger.warning("edge delivery loop: %s", type(exc).__name__, extra={"action": "delivery_error"})
                await asyncio.sleep(0.5)
                continue
            # Traced (bench/hop_trace.py), each message carries its time off Redis and its decode:
            # the batches go the same way as untraced, and a joined one keeps its first message's.
            traced = hoptrace.ON
            if traced:
                _note_read(message, hoptrace.read_time(self.stream_channel))
            # What piled up behind it (the edge was busy) goes with it: a stream's batches that
            # follow one another as one, so each socket takes one offer and one write for them.
            try:
                ready = vendor_redis.receive_ready(self.layer, self.stream_channel, READY_MESSAGES)
            except Exception as exc:  # the layer's internals: the rest comes by receive, one at a time
                logger.warning("edge delivery loop: %s", type(exc).__name__, extra={"action": "delivery_error"})
                ready = []
            taken = [message]
            for got in ready:
                read = hoptrace.read_time(self.stream_channel) if traced else 0.0  # one per message off Redis
                if isinstance(got, vendor_redis.UNREADABLE):
                    self.reject(type(got).__name__)
                elif isinstance(got, Exception):  # as receive's own failures: this one is lost
                    logger.warning("edge delivery loop: %s", type(got).__name__, extra={"action": "delivery_error"})
                else:
                    taken.append(got)
                    if traced:
                        _note_read(got, read)
            for batch in joined_batches(taken) if ready else taken:
                delivering = self._traced(batch) if traced else self.deliver(batch)
                await self._deliver_logged(delivering)

    async def _deliver_logged(self, delivering: Awaitable[None]) -> None:
        try:
            await delivering
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a malformed batch is dropped (the sockets' head check fills it)
            logger.warning("edge dropped a batch: %s", type(exc).__name__, extra={"action": "delivery_error"})

    async def _traced(self, message: dict[str, Any]) -> None:
        """``deliver`` with the times of its steps noted (bench/hop_trace.py), from when its
        (first) message came off Redis (``_note_read``)."""
        steps = {
            "read": message.get(HOP_READ, 0.0) if isinstance(message, dict) else 0.0,
            "received": time.time(),
            "decode_s": message.get(HOP_DECODE, 0.0) if isinstance(message, dict) else 0.0,
        }
        await self.deliver(message)
        steps["offered"] = time.time()
        rows = [(message.get("stream", ""), int(offset)) for offset, _ in message.get("items", ())]

        def written() -> None:  # after the coalescer's flush, queued before this in the same turn
            steps["written"] = time.time()
            hoptrace.record("edge", steps, rows)

        asyncio.get_running_loop().call_soon(written)

    async def deliver(self, message: dict[str, Any]) -> None:
        """Hand one relay batch to every socket of its stream on this edge."""
        if message.get("type") != "bp.batch":
            return
        key = message["stream"]
        sockets = self.members.get(key)
        if not sockets:
            return
        epoch, items = message["epoch"], message["items"]
        # The frames' bytes are the same for every socket: built once, written to each; the
        # same for the stream's audience and the offsets as integers.
        wire = [vendor_daphne.ws_text_frame(frame) for _, frame in items]
        now = time.time()
        for frame in message.get(JOINED_LASTS, ()):  # the last events of relay batches joined into this one
            metrics.observe_latency(frame, now)
        metrics.observe_latency(items[-1][1], now)  # once per relay batch, not per socket
        offsets = [int(offset) for offset, _ in items]
        name = streams.audience_of(key)
        self.stirred.update(sockets)  # their positions moved
        for consumer in list(sockets):
            try:
                rest = consumer.offer(key, name, epoch, items, offsets, wire)
                if rest is not None:
                    await rest
            except Exception as exc:  # one socket's failure must not keep the batch from the rest
                logger.warning("socket dropped a batch: %s", type(exc).__name__, extra={"action": "delivery_error"})

    # --- directed commands ----------------------------------------------------------

    async def _commands(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except vendor_redis.UNREADABLE as exc:  # a forged command is never carried out
                self.reject(type(exc).__name__)
                continue
            except Exception as exc:
                logger.warning("edge command loop: %s", type(exc).__name__, extra={"action": "command_error"})
                await asyncio.sleep(0.5)
                continue
            # A genuine command recorded on another edge's channel and replayed on ours.
            if message.get("edge", self.edge_id) != self.edge_id:
                self.reject("another edge's command")
                continue
            try:
                await self.handle_command(json.loads(message["body"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge command loop: %s", type(exc).__name__, extra={"action": "command_error"})
                await asyncio.sleep(0.5)

    def reject(self, why: str) -> None:
        """Count a message from Redis that is not to be acted on; log at most once per interval."""
        self.rejected += 1
        now = time.monotonic()
        if now - self._rejected_log_at < REJECTED_LOG_INTERVAL_SECS:
            return
        logger.warning(
            "edge %s rejected %d message(s) from Redis (%s): forged, sent with another key, too old, or "
            "replayed from another edge's channel (BACKPLANE_REDIS_KEYS must list the key of every relay and edge)",
            self.edge_id,
            self.rejected - self._rejected_logged,
            why,
            extra={"action": "redis_message_rejected"},
        )
        self._rejected_logged, self._rejected_log_at = self.rejected, now

    async def handle_command(self, body: dict[str, Any]) -> None:
        """Carry out one directed command; idempotent (commands arrive at least once)."""
        command = body.get("command")
        code = int(body.get("code", Close.POLICY))
        targets: list[Subscriber] = []
        if command == "disconnect":
            token_id = body.get("token_id")
            device = body.get("device_id")
            for c in self.consumers.values():
                if (token_id and str(c.principal.token_id) == token_id) or (
                    device and c.principal.device_id == device and str(c.principal.tenant_id) == body.get("tenant_id")
                ):
                    targets.append(c)
        elif command in ("resync", "resume"):
            # resync: 4409, the peer refetches; resume: 4001, the peer reconnects and resumes.
            code = Close.RESYNC if command == "resync" else Close.RECONNECT
            device = body.get("device_id")
            targets = [
                c
                for c in self.consumers.values()
                if str(c.principal.tenant_id) == body.get("tenant_id")
                and (not device or c.principal.device_id == device)
            ]
        elif command == "drain":
            await self.drain(Close.RECONNECT)
            return
        logger.info("edge command %s closes %d sockets", command, len(targets), extra={"action": "command"})
        for c in targets:
            await c.close_with(code)

    # --- heartbeat: directory rows and token re-check -------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(conf.HEARTBEAT_INTERVAL_SECS)
            try:
                await self.leave_idle_groups()
                if _joins_expire(self.layer):
                    await self._rejoin_groups()
                moved = await self._stirred_positions()
                consumers = list(self.consumers.values())
                if self.credentials is None:
                    self.credentials = (
                        frozenset(c.principal.token_id for c in consumers if c.principal.token_id),
                        frozenset(c.principal.recheck_key for c in consumers if c.principal.user_id),
                    )
                token_ids, operators = self.credentials
                metrics.edge.peer_lag = self.lag
                # The rows are built only when the directory misses some (a row per socket
                # every beat would be most of an idle edge's heartbeat).
                rows = _Rows(consumers)
                bad = await database_sync_to_async(_beat)(self.edge_id, rows, token_ids, operators, moved)
                for c in consumers if bad else ():
                    if c.principal.recheck_key in bad:
                        await c.close_with(bad[c.principal.recheck_key])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge heartbeat failed: %s", type(exc).__name__, extra={"action": "heartbeat_error"})

    async def _rejoin_groups(self) -> None:
        """Re-add every socket to its groups: the core layer forgets memberships after
        ``group_expiry`` and on a Redis restart or flush (group_add is idempotent)."""
        prefix = conf.channel_prefix
        assert self.channel is not None  # started
        await self.layer.group_add(streams.edge_group(prefix, self.edge_id), self.channel)
        for key in [k for k, joined in self.joins.items() if joined.done()]:
            await self.layer.group_add(streams.group_name(prefix, key), self.stream_channel)

    def _stirred(self) -> list[Subscriber]:
        """The sockets whose position may have moved since the last beat: a batch of theirs
        arrived, a head of theirs moved, they were just added, or they lagged at the last beat
        (a fill or a replay may have caught them up since)."""
        stirred = {**self.stirred, **self.lagging}
        self.stirred.clear()
        return [c for c in stirred if self.consumers.get(c.connection_id) is c]

    async def _stirred_positions(self) -> dict[str, dict[str, list[int]]]:
        """``_moved_positions`` of the stirred sockets, SOCKETS_PER_TURN of them per turn of
        the loop; a socket gone in between is left out."""
        stirred = self._stirred()
        moved: dict[str, dict[str, list[int]]] = {}
        for start in range(0, len(stirred), SOCKETS_PER_TURN):
            if start:
                await asyncio.sleep(0)
            part = stirred[start : start + SOCKETS_PER_TURN]
            moved.update(self._moved_positions([c for c in part if self.consumers.get(c.connection_id) is c]))
        return moved

    def _moved_positions(self, consumers: Iterable[Subscriber]) -> dict[str, dict[str, list[int]]]:
        """Where each peer stands ({stream: [delivered, lag]}, from the heads the head checks
        read), for the given peers whose position changed since the last beat; the lag
        histogram follows. An idle peer costs the heartbeat nothing."""
        moved: dict[str, dict[str, list[int]]] = {}
        for c in consumers:
            where = {name: list(pos) for name, pos in c.positions(self.last_heads).items()}
            was = self.last_positions.get(c.connection_id)
            if was != where:
                moved[c.connection_id] = where
                self.last_positions[c.connection_id] = where
                for _, lag in (was or {}).values():
                    self.lag.forget(lag)
                for _, lag in where.values():
                    self.lag.observe(lag)
            if not where or any(lag for _, lag in where.values()):
                self.lagging[c] = None
            else:
                self.lagging.pop(c, None)
        return moved

    # --- head check: find and fill trailing loss ------------------------------------

    async def _head_check(self) -> None:
        while True:
            await asyncio.sleep(conf.HEAD_CHECK_INTERVAL_SECS)
            try:
                await self.check_heads()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge head check failed: %s", type(exc).__name__, extra={"action": "head_check_error"})

    async def check_heads(self) -> None:
        """Read the heads that moved since the last check and show them to the sockets of
        their streams (with the sockets added since, and those to look at again); every
        HEAD_SWEEP_INTERVAL_SECS read every connected stream's head and show all of them to
        every socket. An idle socket costs the check nothing between sweeps."""
        sweep = time.monotonic() >= self.next_sweep
        fresh = list(self.unseen)
        self.unseen.clear()
        clock, feed = await database_sync_to_async(self.store.heads_moved_since)(self.feed_since)
        heads = self.last_heads
        if sweep:  # all of them, afresh: also what the feed could have missed
            consumers: Iterable[Subscriber] = list(self.consumers.values())  # added once their hello went out
            heads = await self._read_heads({k for c in consumers for k in c.keys.values()})
            for key, head in heads.items():
                if self.last_heads.get(key) != head:  # missed by the feed: their positions moved
                    self.stirred.update(self.members.get(key, {}))
            self.last_heads = heads
            self.next_sweep = time.monotonic() + conf.HEAD_SWEEP_INTERVAL_SECS
        else:
            # The new sockets' streams no socket of this edge had yet: read by key once.
            new = {k for c in fresh for k in c.keys.values() if k not in heads}
            if new:
                heads.update(await self._read_heads(new))
            targets = dict.fromkeys(fresh)
            targets.update(self.watch)
            for key, head in feed.items():
                sockets = self.members.get(key)
                if sockets and heads.get(key) != head:
                    heads[key] = head
                    targets.update(sockets)
                    self.stirred.update(sockets)
            consumers = targets
        # Since the clock before this read, less the margin: a relay's transaction in flight
        # now stamps the heads it moves with its start, and commits later.
        self.feed_since = clock - timedelta(seconds=conf.HEAD_CHECK_MARGIN_SECS)
        self.watch = {}
        for i, c in enumerate(consumers):
            if i and not i % SOCKETS_PER_TURN:
                await asyncio.sleep(0)  # a sweep's every socket: not in one turn of the loop
            if self.consumers.get(c.connection_id) is not c:  # gone, or still connecting
                continue
            if await c.observe_heads(heads):
                self.watch[c] = None
                self.stirred[c] = None

    async def _read_heads(self, keys: Iterable[str]) -> dict[str, Head]:
        ordered = sorted(keys)
        heads: dict[str, Head] = {}
        for start in range(0, len(ordered), HEAD_QUERY_CHUNK):
            chunk = ordered[start : start + HEAD_QUERY_CHUNK]
            heads.update(await database_sync_to_async(self.store.stream_heads)(chunk))
        return heads


class _Rows:
    """The directory rows of ``consumers``, built when ``directory.beat`` asks for them."""

    def __init__(self, consumers: Sequence[Subscriber]) -> None:
        self.consumers = consumers

    def __len__(self) -> int:
        return len(self.consumers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (c.directory_row() for c in self.consumers)


def _lag_histogram(consumers: Sequence[Subscriber], heads: dict[str, Head]) -> metrics.Histogram:
    """Each socket's lag per stream behind the heads of the last head check."""
    histogram = metrics.Histogram(metrics.LAG_BUCKETS_EVENTS)
    for c in consumers:
        for _delivered, lag in c.positions(heads).values():
            histogram.observe(lag)
    return histogram


def _joins_expire(layer: Any) -> bool:
    # Both forget memberships after group_expiry (the in-memory layer: 24 h by default).
    return type(layer).__name__ in ("RedisChannelLayer", "InMemoryChannelLayer")


def _install_sigterm(runtime: EdgeRuntime) -> None:
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(runtime.shutdown()))

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (tests driving a runtime directly)
        pass


def _beat(
    eid: str,
    rows: directory.Rows,
    token_ids: frozenset[Any],
    operators: frozenset[tuple[Any, Any, Any]],
    positions: dict[str, dict[str, list[int]]] | None = None,
) -> dict[Any, Close]:
    """(Worker thread) one heartbeat's database work in one thread hop: the directory's rows
    (and the positions of the peers that moved), then the live sockets' credentials; return
    the sockets to close and their codes."""
    directory.beat(eid, rows, positions)
    return auth.recheck(token_ids, operators)


# At most this many messages queued behind the one received are taken with it, and a joined
# batch holds at most JOINED_ITEMS items (a longer pile-up is several batches of one loop turn,
# as the queued messages were before: the layer's receive does not suspend while it holds some).
READY_MESSAGES = 64
JOINED_ITEMS = 256
# In a joined batch: the last frame of each relay batch joined into it but the final one, so that
# the commit → frame histogram still takes one sample per relay batch (``deliver``).
JOINED_LASTS = "joined_lasts"
# Traced only (bench/hop_trace.py): a message's time off Redis and its decode, carried by it so
# that a joined batch keeps its first message's (``joined_batches`` keeps the first's keys).
HOP_READ, HOP_DECODE = "_hop_read", "_hop_decode"


def joined_batches(messages: Sequence[Any]) -> list[Any]:
    """``messages`` (relay batches, in arrival order) with each stream's batches that continue
    one another — the same epoch, the next one's first offset right after the last one's last —
    joined into one, at the place of the stream's first; anything else as it came (a malformed
    message too: ``deliver`` drops it alone). A stream's batches keep their order; streams have
    no order between them (docs/protocol.md), so a later stream's batch may now go before an
    earlier one's joined tail."""
    out: list[Any] = []
    last: dict[str, int] = {}  # stream -> index in out of its latest batch
    for m in messages:
        key = m.get("stream") if _joinable(m) else None
        if not isinstance(key, str):
            out.append(m)
            continue
        i = last.get(key)
        if i is not None:
            prev = out[i]
            items = prev["items"]
            if (
                prev.get("epoch") == m.get("epoch")
                and len(items) + len(m["items"]) <= JOINED_ITEMS
                and _offset(m["items"][0]) == _offset(items[-1]) + 1
            ):
                lasts = [*prev.get(JOINED_LASTS, ()), items[-1][1]]
                out[i] = {**prev, "items": [*items, *m["items"]], JOINED_LASTS: lasts}
                continue
        last[key] = len(out)
        out.append(m)
    return out


def _note_read(message: Any, read: float) -> None:
    """Traced only: when ``message`` came off Redis, and the decode before it was handed over
    (a message taken with others piled up behind one carries the last decode of that turn:
    the layer decodes them together; batches of one size decode alike)."""
    if isinstance(message, dict):
        message[HOP_READ], message[HOP_DECODE] = read, hoptrace.last_decode


def _joinable(m: Any) -> bool:
    """A relay batch with an epoch and a non-empty list of [offset, frame] pairs."""
    if not isinstance(m, dict) or m.get("type") != "bp.batch" or not isinstance(m.get("epoch"), str):
        return False
    items = m.get("items")
    return (
        isinstance(items, list)
        and bool(items)
        and all(isinstance(it, list | tuple) and len(it) == 2 and _offset(it) >= 0 for it in items)
    )


def _offset(item: Any) -> int:
    try:
        return int(item[0])
    except (TypeError, ValueError, IndexError):
        return -2  # never continues, nor is continued
