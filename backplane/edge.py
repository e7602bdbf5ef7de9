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
import functools
import json
import logging
import os
import signal
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db.models import Q
from django.utils import timezone

from backplane import outbox, streams
from backplane.conf import conf, edge_id
from backplane.models import AccessToken, Connection, Edge

if TYPE_CHECKING:
    from backplane.consumers import GatewayConsumer

logger = logging.getLogger(__name__)

# Largest number of stream keys in one head query.
HEAD_QUERY_CHUNK = 1000
# After closing every socket on shutdown, wait this long for the close frames to go out.
DRAIN_FLUSH_SECS = 0.5


class EdgeRuntime:
    _by_loop: dict[asyncio.AbstractEventLoop, EdgeRuntime] = {}

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.layer = get_channel_layer()
        self.consumers: dict[str, GatewayConsumer] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.channel: str | None = None
        # Fan-out: the runtime's delivery channel, the sockets of each stream, and the stream
        # groups it joined (or is joining) and is leaving.
        self.stream_channel = ""
        self.members: dict[str, dict[GatewayConsumer, None]] = {}
        self.joins: dict[str, asyncio.Future[None]] = {}
        self.leaving: dict[str, asyncio.Future[None]] = {}
        self.draining = False
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
        await database_sync_to_async(_register_edge)(self.edge_id)
        # The default prefix, like the consumers' channels: the core layer receives every
        # channel of one prefix through one BRPOP loop, and a second prefix would take turns
        # with it (delaying every socket's messages by up to the BRPOP timeout).
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(streams.edge_group(conf.channel_prefix, self.edge_id), self.channel)
        self.stream_channel = await self.layer.new_channel()
        self.tasks = [
            asyncio.create_task(self._batches()),
            asyncio.create_task(self._commands()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._head_check()),
        ]
        _install_sigterm(self)
        logger.info("edge %s started", self.edge_id, extra={"action": "edge_start"})

    async def drain(self, code: int = 4001) -> int:
        """Stop accepting, close every socket with ``code``, remove this edge's directory rows."""
        self.draining = True
        closing = list(self.consumers.values())
        for c in closing:
            await c.close_with(code)
        try:
            await database_sync_to_async(_unregister_edge)(self.edge_id)
        except Exception as exc:  # the sweep removes the rows once the TTL passes
            logger.warning("could not remove edge rows: %s", type(exc).__name__, extra={"action": "drain_error"})
        logger.info("edge %s drained %d sockets", self.edge_id, len(closing), extra={"action": "drained"})
        return len(closing)

    async def shutdown(self) -> None:
        """SIGTERM: drain with 4001 so peers reconnect elsewhere and resume, then exit."""
        await self.drain(4001)
        await asyncio.sleep(DRAIN_FLUSH_SECS)  # let the close frames reach the peers
        for task in self.tasks:
            task.cancel()
        try:
            from twisted.internet import reactor

            reactor.stop()  # type: ignore[attr-defined]
        except Exception:
            os._exit(0)

    def add(self, consumer: GatewayConsumer) -> None:
        self.consumers[consumer.connection_id] = consumer

    def remove(self, consumer: GatewayConsumer) -> None:
        self.consumers.pop(consumer.connection_id, None)

    # --- fan-out: one subscription per stream, batches handed to every socket of it ------

    async def subscribe(self, consumer: GatewayConsumer) -> None:
        """Make ``consumer`` receive its streams' batches; return once the edge is in every
        one of their groups (so what is committed after this is not missed)."""
        keys = list(consumer.keys.values())
        for key in keys:
            self.members.setdefault(key, {})[consumer] = None
        for key in keys:
            await self._join(key)

    def unsubscribe(self, consumer: GatewayConsumer) -> None:
        """Stop handing batches to ``consumer`` (idempotent). Groups no socket needs any more
        are left by the next heartbeat, so a reconnect storm does not churn subscriptions."""
        for key in consumer.keys.values():
            sockets = self.members.get(key)
            if sockets is not None:
                sockets.pop(consumer, None)
                if not sockets:
                    del self.members[key]

    async def _join(self, key: str) -> None:
        leaving = self.leaving.get(key)
        if leaving is not None:  # never let a late group_discard undo this join
            await asyncio.shield(leaving)
        joined = self.joins.get(key)
        if joined is None:
            group = streams.group_name(conf.channel_prefix, key)
            joined = self.joins[key] = asyncio.ensure_future(self.layer.group_add(group, self.stream_channel))
        try:
            await asyncio.shield(joined)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self.joins.get(key) is joined:  # the next socket of this stream tries again
                del self.joins[key]
            raise

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
            except Exception as exc:  # a lost message is filled by the sockets' gap fill / head check
                logger.warning("edge delivery loop: %s", type(exc).__name__, extra={"action": "delivery_error"})
                await asyncio.sleep(0.5)
                continue
            try:
                await self.deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a malformed batch is dropped (the sockets' head check fills it)
                logger.warning("edge dropped a batch: %s", type(exc).__name__, extra={"action": "delivery_error"})

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
        wire = [streams.ws_text_frame(frame) for _, frame in items]
        offsets = [int(offset) for offset, _ in items]
        name = streams.audience_of(key)
        for consumer in list(sockets):
            await consumer.offer(key, name, epoch, items, offsets, wire)

    # --- directed commands ----------------------------------------------------------

    async def _commands(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message = await self.layer.receive(self.channel)
                await self.handle_command(json.loads(message["body"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge command loop: %s", type(exc).__name__, extra={"action": "command_error"})
                await asyncio.sleep(0.5)

    async def handle_command(self, body: dict[str, Any]) -> None:
        """Carry out one directed command; idempotent (commands arrive at least once)."""
        command = body.get("command")
        code = int(body.get("code", 4008))
        targets: list[GatewayConsumer] = []
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
            code = 4409 if command == "resync" else 4001
            device = body.get("device_id")
            targets = [
                c
                for c in self.consumers.values()
                if str(c.principal.tenant_id) == body.get("tenant_id")
                and (not device or c.principal.device_id == device)
            ]
        elif command == "drain":
            await self.drain(4001)
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
                consumers = list(self.consumers.values())
                token_ids = {c.principal.token_id for c in consumers if c.principal.token_id}
                operators = {(c.principal.tenant_id, c.principal.user_id) for c in consumers if c.principal.user_id}
                rows = [c.directory_row() for c in consumers]
                bad = await database_sync_to_async(_beat)(self.edge_id, token_ids, operators, rows)
                for c in consumers:
                    key = c.principal.token_id or (c.principal.tenant_id, c.principal.user_id)
                    if key in bad:
                        await c.close_with(bad[key])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge heartbeat failed: %s", type(exc).__name__, extra={"action": "heartbeat_error"})

    async def _rejoin_groups(self) -> None:
        """Re-add every socket to its groups: the core layer forgets memberships after
        ``group_expiry`` and on a Redis restart or flush (group_add is idempotent)."""
        prefix = conf.channel_prefix
        await self.layer.group_add(streams.edge_group(prefix, self.edge_id), self.channel)
        for key in [k for k, joined in self.joins.items() if joined.done()]:
            await self.layer.group_add(streams.group_name(prefix, key), self.stream_channel)

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
        consumers = [c for c in self.consumers.values() if c.cursors]
        keys = sorted({k for c in consumers for k in c.keys.values()})
        heads: dict[str, outbox.Head] = {}
        for start in range(0, len(keys), HEAD_QUERY_CHUNK):
            heads.update(await database_sync_to_async(outbox.stream_heads)(keys[start : start + HEAD_QUERY_CHUNK]))
        for c in consumers:
            await c.observe_heads(heads)


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


def _unregister_edge(eid: str) -> None:
    Connection.objects.filter(edge_id=eid).delete()
    Edge.objects.filter(edge_id=eid).delete()


def _register_edge(eid: str) -> None:
    now = timezone.now()
    Edge.objects.update_or_create(
        edge_id=eid, defaults={"host": socket.gethostname(), "heartbeat_at": now, "started_at": now}
    )


def _beat(
    eid: str, token_ids: set[Any], operators: set[tuple[Any, Any]], rows: list[dict[str, Any]] | None = None
) -> dict[Any, int]:
    """Refresh this edge's rows; sweep dead rows; return the sockets to close and their codes.

    If this edge's rows were swept while it lived (a heartbeat stall past the TTL), the edge
    row and the rows of its live sockets are written again.
    """
    now = timezone.now()
    ttl = timedelta(seconds=conf.CONNECTION_TTL_SECS)
    if not Edge.objects.filter(edge_id=eid).update(heartbeat_at=now):
        _register_edge(eid)
    refreshed = Connection.objects.filter(edge_id=eid).update(expires_at=now + ttl, last_seen_at=now)
    if rows is not None and refreshed != len(rows):
        # Rows of sockets this edge no longer holds (a failed delete at disconnect) go;
        # rows of live sockets that were swept come back.
        live = [row["connection_id"] for row in rows]
        # Only rows older than a beat: a socket that is opening has its row before the
        # runtime lists it.
        settled = now - timedelta(seconds=conf.HEARTBEAT_INTERVAL_SECS)
        Connection.objects.filter(edge_id=eid, connected_at__lt=settled).exclude(connection_id__in=live).delete()
        # Only the missing rows: in a connect storm the counts differ at every beat (rows of
        # sockets still opening), and re-inserting every row each time cost more than the storm.
        have = set(Connection.objects.filter(edge_id=eid).values_list("connection_id", flat=True))
        Connection.objects.bulk_create(
            [
                Connection(edge_id=eid, expires_at=now + ttl, last_seen_at=now, **row)
                for row in rows
                if row["connection_id"] not in have
            ],
            ignore_conflicts=True,
        )
    # Rows of edges that died without a clean close.
    Connection.objects.filter(expires_at__lt=now).delete()
    Edge.objects.filter(heartbeat_at__lt=now - ttl).exclude(edge_id=eid).delete()
    bad: dict[Any, int] = {}
    if token_ids:
        found = (
            AccessToken.objects.filter(id__in=token_ids)
            .filter(Q(revoked_at__isnull=False) | Q(tenant__is_active=False) | Q(expires_at__lte=now))
            .values_list("id", "revoked_at", "tenant__is_active")
        )
        for tid, revoked_at, active in found:
            bad[tid] = 4008 if (revoked_at is not None or not active) else 4401
    if operators:
        from backplane.models import OperatorAccess

        still = set(
            OperatorAccess.objects.filter(
                tenant_id__in={t for t, _ in operators},
                user_id__in={u for _, u in operators},
                tenant__is_active=True,
                user__is_active=True,
            ).values_list("tenant_id", "user_id")
        )
        for key in operators - still:
            bad[key] = 4008
    return bad


def install_daphne_denial_response() -> None:
    """Teach daphne two things the protocol needs and its application API cannot express.

    1. The ASGI "websocket.http.response" extension, for HTTP 503 refusals: daphne answers
       every refused upgrade with 403; PROTOCOL.md wants 503 when the edge cannot check a
       credential right now, so peers retry with backoff.
    2. A slow-consumer bound: daphne accepts every send and buffers it in the socket's
       transport, with no backpressure to the application. When a peer's unsent bytes pass
       ``MAX_OUTBOUND_BUFFER_BYTES``, further frames are dropped and the socket is closed
       with 4013 (the close frame queues behind what is buffered; the peer gets
       ``SLOW_CLOSE_GRACE_SECS`` to read up to it before the connection is cut).
    """
    try:
        from autobahn.websocket.types import ConnectionDeny
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not running under daphne
        return
    if getattr(WebSocketProtocol, "_tyrum_denial", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            self.handshake_deferred.errback(ConnectionDeny(code=int(message.get("status", 503)), reason="Unavailable"))
            del self.handshake_deferred
            self.server.protocol_disconnected(self)
            return
        if kind == "websocket.http.response.body":
            return
        if kind == "websocket.send" and self.state == self.STATE_OPEN:
            if getattr(self, "_tyrum_slow", False):
                return  # already closing with 4013: drop further frames
            if outbound_buffered(self.transport) > outbound_limit():
                self._tyrum_slow = True
                logger.warning("slow consumer: closing with 4013", extra={"action": "slow_consumer"})
                self.closeHandshakeTimeout = conf.SLOW_CLOSE_GRACE_SECS
                self.sendClose(code=4013)
                return
        original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._tyrum_denial = True


@functools.cache
def outbound_limit() -> int:
    """MAX_OUTBOUND_BUFFER_BYTES, read once (it is checked for every frame sent)."""
    return int(conf.MAX_OUTBOUND_BUFFER_BYTES)


def outbound_buffered(transport: Any) -> int:
    """Bytes a twisted TCP transport holds that the peer has not taken yet."""
    data = getattr(transport, "dataBuffer", b"")
    offset = int(getattr(transport, "offset", 0))
    return len(data) - offset + int(getattr(transport, "_tempDataLen", 0))
