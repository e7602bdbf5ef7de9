"""The WebSocket consumer: one per peer socket, exactly per PROTOCOL.md (``tyrum-v1``).

Per stream it keeps a ``DeliveryCursor``: live batches below the cursor are repeats and
dropped; a batch beyond it means the transport lost something, and the gap is read from
the outbox before the batch is sent. Live delivery is held for a new connection until its
first frame (or LIVE_HOLD_MS), so a resume's replay is never overtaken by live events.

A consumer has no channel of its own: the edge runtime holds one subscription per stream
for all of its sockets and hands each batch to every socket of that stream (``offer``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import socket
import time
import uuid
import weakref
from datetime import timedelta
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import IntegrityError, transaction
from django.utils import timezone

from backplane import auth, edge, exceptions, outbox, streams
from backplane.conf import conf
from backplane.edge import EdgeRuntime
from backplane.models import Connection

logger = logging.getLogger(__name__)

try:  # the transports _send_now may write to with send() directly: plain TCP connections
    from twisted.internet.tcp import Connection as _PLAIN_TCP
except ImportError:  # pragma: no cover  (daphne brings twisted)
    _PLAIN_TCP = ()  # type: ignore[assignment,misc]

Batch = tuple[str, str, list[list[Any]]]  # (stream name, epoch, [[offset, frame], ...])


# The live hold (LIVE_HOLD_MS) goes on while the peer's first frame is on its way in, polled
# this often, for at most this much longer.
HOLD_POLL_SECS = 0.01
HOLD_EXTENSION_SECS = 5.0


class _Closed(Exception):
    """Raised inside delivery when the socket was closed under it."""


class _Gone(Exception):
    """The peer left (daphne dropped the handshake or the socket) before its database work ran."""


class GatewayConsumer(AsyncWebsocketConsumer):
    # No per-socket channel (an alias that is not configured gives no layer): batches come
    # from the edge runtime's one subscription per stream, not through a channel per socket.
    channel_layer_alias = "tyrum.edge-runtime"
    connection_id: str
    principal: auth.Principal

    async def connect(self) -> None:
        self.connection_id = uuid.uuid4().hex
        self.proto = _daphne_protocol(self.base_send)  # daphne's protocol object (None elsewhere)
        self.keys: dict[str, str] = {}
        self.cursors: dict[str, streams.DeliveryCursor] = {}
        self.lag_seen: dict[str, int] = {}
        self.closed = False
        self.first_frame_seen = False
        self.holding = True
        self.held: list[Batch] = []
        self.backlog: collections.deque[Batch] = collections.deque()
        self.drainer: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.wire: Any = None  # daphne's protocol object, when frames can be written directly
        self.runtime: EdgeRuntime | None = None
        self.row_written = False
        self.tokens = float(conf.INBOUND_BURST)
        self.tokens_at = time.monotonic()
        if auth.url_has_credential(self.scope.get("query_string", b"")):
            logger.warning(
                "refused: credential in URL (path %s)",
                self.scope.get("path"),
                extra={"action": "refused_url_credential"},
            )
            await self.close()
            return
        if auth.PROTOCOL not in (self.scope.get("subprotocols") or []):
            logger.info("refused: subprotocol %s not offered", auth.PROTOCOL, extra={"action": "refused_protocol"})
            await self.close()
            return
        try:
            self.principal = await _db(_unless_gone)(self, auth.authenticate, self.scope)
        except _Gone:
            self.closed = True
            return  # daphne dropped the handshake while it waited (a connect storm): nothing to do
        except auth.AuthRefused as exc:
            logger.info("refused: %s", exc, extra={"action": "refused_auth"})
            await self.close()
            return
        except exceptions.StoreUnavailable:
            logger.warning("credential check unavailable: answering 503", extra={"action": "refused_unavailable"})
            await self._deny(503)
            return
        server = self.scope.get("server") or (None, None)
        try:
            self.runtime = await EdgeRuntime.get(server[1])
            if self.runtime.draining:
                self.runtime = None
                await self._deny(503)
                return
            p = self.principal
            self.keys = streams.connection_streams(p.tenant_id, p.role, p.device_id)
            # Subscribed before the heads are read: nothing after the hello's heads is missed
            # (batches arriving meanwhile are held, and repeats dropped by the cursors).
            await self.runtime.subscribe(self)
            heads = await _db(_unless_gone)(self, _open, self, self.runtime.edge_id)
        except _Gone:
            self.closed = True
            self.runtime.unsubscribe(self)
            return
        except Exception as exc:
            logger.warning("connect failed: %s", type(exc).__name__, extra={"action": "connect_error"})
            self.closed = True
            if self.runtime is not None:
                self.runtime.unsubscribe(self)
            await self._deny(503)
            return
        await self.accept(auth.PROTOCOL)
        self.wire = _direct_wire(self.proto)
        self.coalescer = _coalescer()
        if self.wire is not None:
            # Frames written directly wait for the end of the loop turn (_Coalescer); anything
            # sent the ASGI way (a pong, a close) must not overtake them.
            asgi_send, wire = self.base_send, self.wire

            async def ordered_send(message: dict[str, Any]) -> None:
                self.coalescer.flush(wire)
                await asgi_send(message)

            self.base_send = ordered_send
        self.hello_heads = {name: heads[key] for name, key in self.keys.items()}
        self.cursors = {name: streams.DeliveryCursor(h.epoch, h.offset) for name, h in self.hello_heads.items()}
        await self.send(
            text_data=json.dumps(
                {
                    "type": "hello",
                    "protocol": auth.PROTOCOL,
                    "connection_id": self.connection_id,
                    "edge_id": self.runtime.edge_id,
                    "streams": {name: {"epoch": h.epoch, "offset": h.offset} for name, h in self.hello_heads.items()},
                },
                separators=(",", ":"),
            )
        )
        self.runtime.add(self)
        self.hold_task = asyncio.create_task(self._hold_timer())
        logger.info("connected %s", self.connection_id, extra={"action": "connected"})

    async def _deny(self, status: int) -> None:
        """Refuse the upgrade with an HTTP status (see edge.install_daphne_denial_response)."""
        await self.base_send({"type": "websocket.http.response.start", "status": status, "headers": []})
        await self.base_send({"type": "websocket.http.response.body", "body": b""})

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if self.runtime is None or not self.keys:
            return
        self.runtime.remove(self)
        self.runtime.unsubscribe(self)
        for task in (getattr(self, "hold_task", None), self.drainer):
            if task is not None:
                task.cancel()
        if not self.row_written:
            return
        try:
            await _db(Connection.objects.filter(connection_id=self.connection_id).delete)()
        except Exception as exc:  # the heartbeat sweep removes it later
            logger.warning("could not remove connection row: %s", type(exc).__name__, extra={"action": "disconnect"})
        logger.info("disconnected %s code %s", self.connection_id, code, extra={"action": "disconnected"})

    def directory_row(self) -> dict[str, Any]:
        p = self.principal
        return {
            "connection_id": self.connection_id,
            "tenant_id": p.tenant_id,
            "device_id": p.device_id,
            "role": p.role,
            "token_id": p.token_id,
            # The edge's delivery channel: the runtime fans batches out to its sockets.
            "channel_name": self.runtime.stream_channel if self.runtime else "",
        }

    async def close_with(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            await self.close(code=code)

    # --- inbound frames -------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closed:
            return
        if text_data is None:
            await self.close_with(4400)
            return
        if len(text_data) > conf.MAX_INBOUND_FRAME_BYTES or len(text_data.encode()) > conf.MAX_INBOUND_FRAME_BYTES:
            await self.close_with(4009)
            return
        if not self._take_token():
            await self.close_with(4029)
            return
        try:
            frame = json.loads(text_data)
        except ValueError:
            frame = None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            await self.close_with(4400)
            return
        first = not self.first_frame_seen
        self.first_frame_seen = True
        kind = frame["type"]
        if kind == "resume":
            if first:
                await self._resume(frame)
            else:
                await self._send_json({"type": "error", "code": "resume_not_first"})
            return
        if first:
            await self._release()
        if kind == "ping":
            await self._send_json({"type": "pong"})
        else:
            await self._send_json({"type": "error", "code": "unknown_type"})

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(conf.INBOUND_BURST), self.tokens + (now - self.tokens_at) * conf.INBOUND_RATE_PER_SEC)
        self.tokens_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    async def _send_json(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            await self.send(text_data=json.dumps(obj, separators=(",", ":")))

    # --- resume ---------------------------------------------------------------------

    async def _resume(self, frame: dict[str, Any]) -> None:
        wanted = frame.get("streams")
        if not isinstance(wanted, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("epoch"), str)
            and isinstance(v.get("offset"), int)
            and not isinstance(v.get("offset"), bool)
            and v["offset"] >= 0
            for v in wanted.values()
        ):
            await self._send_json({"type": "error", "code": "invalid_resume"})
            await self._release()
            return
        async with self.lock:
            result: dict[str, dict[str, Any]] = {}
            for name, pos in wanted.items():
                result[name] = await self._replay(name, pos["epoch"], pos["offset"])
                if self.closed:
                    return
            await self._send_json({"type": "resumed", "streams": result})
        await self._release()

    async def _replay(self, name: str, epoch: str, offset: int) -> dict[str, Any]:
        head = self.hello_heads.get(name)
        if head is None:
            return {"recovered": False, "reason": "unknown_stream"}
        if epoch != head.epoch:
            return {"recovered": False, "reason": "epoch_changed"}
        if offset > head.offset:
            return {"recovered": False, "reason": "offset_ahead"}
        missing = head.offset - offset
        if offset + 1 < head.first_retained or missing > conf.MAX_REPLAY_EVENTS:
            return {"recovered": False, "reason": "retention_exceeded"}
        try:
            items = await _db(_unless_gone)(self, outbox.read_range, self.keys[name], offset, head.offset)
        except _Gone:
            self.closed = True
            return {"recovered": False, "reason": "retention_exceeded"}  # never sent: the peer is gone
        if len(items) != missing:  # all or nothing: never a partial replay called recovered
            return {"recovered": False, "reason": "retention_exceeded"}
        for item in items:
            await self._send_text(streams.event_frame(name, head.epoch, item))
        return {"recovered": True, "replayed": missing}

    # --- live delivery --------------------------------------------------------------

    async def _hold_timer(self) -> None:
        await asyncio.sleep(conf.LIVE_HOLD_MS / 1000)
        # The peer's first frame may have arrived in time and still wait to be processed (a
        # busy edge: a failover storm). Releasing now would let live events overtake that
        # resume's replay, so the hold lasts while a frame is on its way in — bounded, for a
        # peer that trickles a frame byte by byte.
        proto = self.proto
        until = time.monotonic() + HOLD_EXTENSION_SECS  # wall time: a busy loop's sleeps run long
        while not self.first_frame_seen and time.monotonic() < until and _frame_pending(proto):
            await asyncio.sleep(HOLD_POLL_SECS)
        for _ in range(3):  # a message just taken off daphne's queue reaches receive() in a turn or two
            if self.first_frame_seen:
                return  # receive() releases, after a resume's replay
            await asyncio.sleep(0)
        try:
            await self._release()
        except Exception as exc:
            await self._failed(exc)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Dispatch, but never let a handler's error leave a half-alive consumer behind:
        close with 4001 (the peer reconnects and resumes) and let disconnect() clean up.

        Unlike channels' dispatch, no ``aclose_old_connections()`` thread hop per message:
        every database call here goes through ``database_sync_to_async``, which closes old
        connections itself, and a hop per inbound frame cost more than the frame's work."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        try:
            await handler(message)
        except StopConsumer:
            raise
        except Exception as exc:
            await self._failed(exc)

    async def _failed(self, exc: BaseException) -> None:
        logger.error("consumer failed (%s): closing 4001", type(exc).__name__, extra={"action": "consumer_error"})
        if getattr(self, "cursors", None):
            await self.close_with(4001)
        else:  # failed before accept
            await self.close()

    async def _release(self) -> None:
        if not self.holding:
            return
        async with self.lock:
            self.holding = False
            held, self.held = self.held, []
            try:
                for batch in held:
                    await self._deliver(*batch)
            except _Closed:
                return

    async def offer(
        self,
        key: str,
        name: str,
        epoch: str,
        items: list[list[Any]],
        offsets: list[int],
        wire: list[bytes] | None = None,
    ) -> None:
        """A relay's batch for one of this socket's streams, handed over by the edge runtime.

        The common case — the batch continues the cursor — is written to the socket at once,
        without a task or a lock (as the frame bytes ``wire`` the runtime built once for all
        the stream's sockets, when daphne's transport can take them directly). Anything else
        (held for a new connection, behind a gap fill or a replay, a gap, a new epoch)
        queues for ``_drain``, which may read the outbox; the runtime never waits for one
        socket's database reads. ``name`` (the stream's audience) and ``offsets`` (the items'
        offsets as integers) are worked out once per batch by the runtime.
        """
        if self.closed or self.keys.get(name) != key:
            return
        if self.holding:
            self.held.append((name, epoch, items))
            return
        if self.backlog or self.lock.locked():
            self._queue((name, epoch, items))
            return
        cursor = self.cursors[name]
        if epoch != cursor.epoch:
            self._queue((name, epoch, items))
            return
        proto = self.wire if wire is not None else None
        try:
            for n, offset in enumerate(offsets):
                if offset < cursor.next:
                    continue  # a repeat
                if offset > cursor.next:  # a gap: the rest goes the slow way
                    self._queue((name, epoch, items[n:]))
                    return
                cursor.next = offset + 1
                if self.closed:
                    return
                if proto is None or not _write_direct(proto, wire[n], self.coalescer):  # type: ignore[index]
                    await self.base_send({"type": "websocket.send", "text": items[n][1]})
        except Exception as exc:
            await self._failed(exc)

    def _queue(self, batch: Batch) -> None:
        self.backlog.append(batch)
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            async with self.lock:
                while self.backlog and not self.closed:
                    await self._deliver(*self.backlog.popleft())
        except _Closed:
            return
        except Exception as exc:
            await self._failed(exc)

    async def _deliver(self, name: str, epoch: str, items: list[list[Any]]) -> None:
        cursor = self.cursors[name]
        if epoch != cursor.epoch:  # the stream was recreated: offsets mean nothing now
            await self.close_with(4409)
            raise _Closed
        frames = {int(o): f for o, f in items}
        for step in cursor.plan(sorted(frames)):
            if isinstance(step, tuple):
                await self._fill(name, cursor.epoch, step[0] - 1, step[1])
            else:
                await self._send_text(frames[step])

    async def _fill(self, name: str, epoch: str, after: int, upto: int) -> None:
        # The cursor has moved past the gap already: if the gap cannot be sent now, the socket
        # must close (4001) so the peer resumes from what it really processed.
        if upto - after > conf.MAX_REPLAY_EVENTS:
            await self.close_with(4001)
            raise _Closed
        try:
            items = await _db(outbox.read_range)(self.keys[name], after, upto)
        except Exception as exc:
            logger.warning("gap fill failed (%s): closing 4001", type(exc).__name__, extra={"action": "gap_error"})
            await self.close_with(4001)
            raise _Closed from None
        if len(items) != upto - after:  # compacted away: the peer must refetch
            logger.warning("gap %s..%s no longer in the outbox", after + 1, upto, extra={"action": "gap_lost"})
            await self.close_with(4409)
            raise _Closed
        logger.info("filled %d missed events from the outbox", len(items), extra={"action": "gap_filled"})
        for item in items:
            await self._send_text(streams.event_frame(name, epoch, item))

    async def _send_text(self, text: str) -> None:
        """Send one frame of a replay, a gap fill or a slow-path batch (directly to daphne's
        transport when it can take it: a 10 000-event replay is 10 000 of these)."""
        if self.closed:
            raise _Closed
        if self.wire is not None and _write_direct(self.wire, streams.ws_text_frame(text), self.coalescer):
            return
        await self.base_send({"type": "websocket.send", "text": text})

    async def observe_heads(self, heads: dict[str, outbox.Head]) -> None:
        """Fill a lag that persists across two head checks (the relay was not just slow)."""
        if self.holding or self.closed:
            return
        try:
            await self._observe_heads(heads)
        except Exception as exc:
            await self._failed(exc)

    async def _observe_heads(self, heads: dict[str, outbox.Head]) -> None:
        for name, key in self.keys.items():
            head = heads.get(key)
            cursor = self.cursors.get(name)
            if head is None or cursor is None:
                continue
            if head.epoch != cursor.epoch:
                await self.close_with(4409)
                return
            seen = self.lag_seen.pop(name, None)
            if seen is not None and cursor.next <= seen:
                async with self.lock:
                    if cursor.next <= seen:
                        target = seen
                        after = cursor.next - 1
                        cursor.next = target + 1
                        try:
                            await self._fill(name, cursor.epoch, after, target)
                        except _Closed:
                            return
            if cursor.next <= head.offset:
                self.lag_seen[name] = head.offset


def _db(fn: Any) -> Any:
    """``database_sync_to_async`` for a socket's own database work (credential check,
    directory row, replay, gap fill). On PostgreSQL it runs on the shared worker threads (each
    with its own connection), so handshakes and replays of many peers overlap instead of
    queuing behind each other on the one thread-sensitive thread; SQLite keeps that one
    thread (one writer at a time anyway).

    Django's health check (``CONN_HEALTH_CHECKS``) is skipped for these calls: it costs a
    ``SELECT 1`` round trip before every one of them (14 % of the edge's samples in a connect
    storm). A connection that died fails the call instead (the peer gets 503 or a 4001 and
    retries), and Django discards it right after, as it does for any failed query. But once a
    call has failed on the database, the checks run again for ``SUSPECT_SECS``: after an
    outage every worker thread holds a dead connection, and without them each would fail one
    handshake of its own before it reconnected — with the peers' back-off, tens of seconds
    of 503s after the database was back."""

    def call(*args: Any) -> Any:
        from django.db import InterfaceError, OperationalError, connection

        global _suspect_until
        if connection.connection is not None and time.monotonic() >= _suspect_until:
            connection.health_check_done = True
        try:
            return fn(*args)
        except (OperationalError, InterfaceError, exceptions.StoreUnavailable) as exc:
            cause = exc.__cause__ if isinstance(exc, exceptions.StoreUnavailable) else exc
            if isinstance(cause, OperationalError | InterfaceError):  # the connection, not the query
                _suspect_until = time.monotonic() + SUSPECT_SECS
            raise

    return database_sync_to_async(call, thread_sensitive=not conf.is_postgresql)


# How long after a failed database call the edge checks its connections before using them.
SUSPECT_SECS = 60.0
_suspect_until = 0.0


def _unless_gone(consumer: GatewayConsumer, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` (in the database thread) unless the peer has left meanwhile.

    The edge's database work runs on one thread, in order. In a connect storm (e.g. the peers of
    a killed edge failing over) handshakes wait there longer than daphne's 5 s connect timeout;
    daphne drops them, their peers retry, and without this check the thread would still do the
    work of every dropped attempt, falling further behind with each retry."""
    if _gone(consumer.proto):
        raise _Gone
    return fn(*args)


def _daphne_protocol(send: Any) -> Any:
    """daphne's protocol object behind an ASGI ``send`` (``partial(handle_reply, protocol)``),
    or None when not under daphne."""
    if not isinstance(send, functools.partial) or not send.args:
        return None
    return send.args[0]


def _gone(proto: Any) -> bool:
    """Whether daphne has dropped the connection of its protocol object ``proto`` (False when
    not under daphne, or when it cannot tell)."""
    if proto is None:
        return False
    connections = getattr(getattr(proto, "server", None), "connections", None)
    if not isinstance(connections, dict):
        return False
    entry = connections.get(proto)
    return entry is None or "disconnected" in entry


def _direct_wire(proto: Any) -> Any:
    """Return daphne's WebSocket protocol object ``proto`` if frames can be written straight
    to its transport (no per-message compression negotiated); otherwise None."""
    needed = ("transport", "state", "STATE_OPEN", "send_state", "SEND_STATE_GROUND")
    if not all(hasattr(proto, a) for a in needed) or getattr(proto, "_perMessageCompress", None) is not None:
        return None
    return proto


def _frame_pending(proto: Any) -> bool:
    """Whether the peer has sent something this edge has not dispatched yet: a message in
    daphne's application queue, a partial frame in autobahn's buffer, or bytes unread in the
    kernel. False when not under daphne (nothing to look at)."""
    if proto is None:
        return False
    queue = getattr(proto, "application_queue", None)
    if queue is not None and queue.qsize() > 0:
        return True
    if getattr(proto, "data", b""):
        return True
    sock = getattr(getattr(proto, "transport", None), "socket", None)
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing unread; others: the socket is going away
        return False


def _write_direct(proto: Any, data: bytes, coalescer: _Coalescer) -> bool:
    """Write a prepared frame to daphne's transport, skipping the ASGI send path (daphne's
    reply dispatch and autobahn's framing: most of a fan-out's cost). Return False when it
    must go the normal way: the socket is not plainly open, a frame is half sent, or the
    peer's unread bytes are past the slow-consumer bound (the normal path closes 4013)."""
    if proto.state != proto.STATE_OPEN or proto.send_state != proto.SEND_STATE_GROUND:
        return False
    if getattr(proto, "_tyrum_slow", False):
        return True  # closing with 4013: further frames are dropped
    if edge.outbound_buffered(proto.transport) + coalescer.held(proto) > edge.outbound_limit():
        return False
    coalescer.write(proto, data)
    return True


class _Coalescer:
    """The frames written directly to each socket in one loop turn, sent together at the end
    of the turn: one ``send()`` per socket per turn, straight to the socket when twisted holds
    nothing unsent for it. (``transport.write`` alone registers the socket for writability and
    unregisters it after each flush — two epoll changes per frame, a third of the edge's CPU in
    a fan-out; and a frame sent at once instead of at the end of the turn measured worse still:
    the frames of one turn would no longer share a segment.)

    A socket's frames held here are at most FLUSH_BYTES (a replay of thousands of frames in one
    turn goes out as it goes), and count towards the slow-consumer bound (``held``)."""

    FLUSH_BYTES = 64 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[Any, list[Any]] = {}  # proto -> [frames, bytes]
        self.scheduled = False

    def held(self, proto: Any) -> int:
        entry = self.pending.get(proto)
        return entry[1] if entry is not None else 0

    def write(self, proto: Any, data: bytes) -> None:
        entry = self.pending.get(proto)
        if entry is not None:
            entry[0].append(data)
            entry[1] += len(data)
            if entry[1] >= self.FLUSH_BYTES:
                self.flush(proto)
            return
        self.pending[proto] = [[data], len(data)]
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush_all)

    def flush(self, proto: Any) -> None:
        entry = self.pending.pop(proto, None)
        if entry is not None:
            _send_frames(proto, entry[0])

    def flush_all(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        for proto, entry in pending.items():
            _send_frames(proto, entry[0])


def _send_frames(proto: Any, frames: list[bytes]) -> None:
    """Send a socket's held frames — unless its WebSocket is no longer open (a close frame
    went out meanwhile: nothing may follow it). A socket whose send fails unexpectedly is cut
    (its peer reconnects and resumes); the other sockets' frames still go."""
    if proto.state != proto.STATE_OPEN:
        return
    try:
        _send_now(proto.transport, frames[0] if len(frames) == 1 else b"".join(frames))
    except Exception as exc:
        logger.error(
            "frame write failed (%s): dropping the connection", type(exc).__name__, extra={"action": "write_error"}
        )
        with contextlib.suppress(Exception):
            proto.transport.abortConnection()


_coalescers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Coalescer] = weakref.WeakKeyDictionary()


def _coalescer() -> _Coalescer:
    """The running loop's coalescer (a consumer keeps it: its loop does not change)."""
    loop = asyncio.get_running_loop()
    found = _coalescers.get(loop)
    if found is None:
        found = _coalescers[loop] = _Coalescer(loop)
    return found


def _send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a twisted transport: with one ``send()`` when it is a plain TCP
    connection holding nothing unsent, the rest (if the kernel took part) through
    ``transport.write``. Anything else — TLS (twisted's TLS wrapper passes the raw socket's
    attributes through: only its own ``write`` encrypts), a test double — goes through
    ``transport.write``."""
    if transport.disconnected or transport.disconnecting:
        return
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or not isinstance(transport, _PLAIN_TCP)
        or getattr(transport, "TLS", False)
        or edge.outbound_buffered(transport)
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:  # the connection is going away: twisted finds out and closes it
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def _open(consumer: GatewayConsumer, edge_id: str) -> dict[str, outbox.Head]:
    """Read the connection's heads (after it joined its groups) and add its directory row."""
    p = consumer.principal
    heads = outbox.ensure_streams(p.tenant_id, list(consumer.keys.values()))
    expires = timezone.now() + timedelta(seconds=conf.CONNECTION_TTL_SECS)
    consumer.row_written = True  # from here on, disconnect() removes the row
    try:
        with transaction.atomic():
            Connection.objects.create(edge_id=edge_id, expires_at=expires, **consumer.directory_row())
    except IntegrityError:  # this edge's row was swept (a stalled heartbeat): register again
        from backplane.edge import _register_edge

        _register_edge(edge_id)
        Connection.objects.create(edge_id=edge_id, expires_at=expires, **consumer.directory_row())
    return heads
