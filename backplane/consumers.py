"""The WebSocket consumer: the ``tyrum-v1`` state machine of one socket (docs/protocol.md).

Read it beside the protocol document: ``connect`` checks the upgrade (URL credential,
subprotocol, credential, draining) and sends ``hello``; ``receive`` takes frames (``resume``
first, ``ping``, limits and their close codes); relay batches arrive through ``offer`` from
the edge runtime (``edge.py``), which holds one subscription per stream for all its sockets.

What to send, fill or close is decided by the socket's ``Delivery`` (``delivery.py``, pure);
this class carries it out: the outbox reads (replays and gap fills, in worker threads), the
sends (straight to daphne's transport where it can: ``vendor/daphne.py``), the live hold's
timer, and the one lock that keeps the slow path's sends in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer

from backplane import auth, directory, edge_db, exceptions, handshakes, limits, metrics, protocol, refusals, streams
from backplane.conf import conf
from backplane.delivery import Batch, CloseWith, Delivery, Fill, Lag, Release, Reply, Resume, TokenBucket
from backplane.edge import EdgeRuntime
from backplane.protocol import Close
from backplane.store import Store, get_store
from backplane.vendor import channels as vendor_channels
from backplane.vendor import daphne as vendor_daphne

logger = logging.getLogger(__name__)
counts = metrics.edge  # a module global: the fan-out reads it without an attribute lookup on metrics

# The live hold (LIVE_HOLD_MS) goes on while the peer's first frame is on its way in, polled
# this often, for at most this much longer (docs/decisions/0022-live-hold-until-first-frame.md).
HOLD_POLL_SECS = 0.01
HOLD_EXTENSION_SECS = 5.0


class _Closed(Exception):
    """Raised inside delivery when the socket was closed under it."""


class _OverCap(Exception):
    """Raised when a connection would pass its token's or its tenant's connection cap."""


class _Gone(Exception):
    """Raised when the peer left (daphne dropped the handshake or the socket) before its
    database work ran."""


class GatewayConsumer(AsyncWebsocketConsumer):
    """One peer socket. Implements the edge runtime's ``Subscriber``."""

    # No per-socket channel: batches come from the edge runtime's one subscription per stream.
    channel_layer_alias = vendor_channels.NO_LAYER_ALIAS
    connection_id: str
    principal: auth.Principal
    delivery: Delivery

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """channels' ``AsyncConsumer.__call__`` for a consumer without a channel layer: each
        message is awaited straight from daphne's queue and dispatched in this task, in order.
        channels' ``await_many_dispatch`` receives every message in a task of its own and waits
        for it with ``asyncio.wait`` (a task, a waiter and callbacks per message, a task more
        per idle socket): per-handshake work in a connect storm (docs/decisions/0038)."""
        self.scope = scope
        self.channel_layer = None  # type: ignore[assignment]  # channels' stubs: always a layer
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def connect(self) -> None:
        self.connection_id = uuid.uuid4().hex
        self.proto = vendor_daphne.protocol_of(self.base_send)  # daphne's protocol object, or None
        self.keys: dict[str, str] = {}
        self.closed = False
        self.drainer: asyncio.Task[None] | None = None
        self.hold_task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()  # the slow path: replays, gap fills, queued batches
        self.wire: Any = None  # daphne's protocol object, when frames can be written directly
        self.runtime: EdgeRuntime | None = None
        self.row_written = False
        # Batches handed over between the subscription and the Delivery (the heads are being
        # read): they join its backlog, held like any other until the first frame.
        self.early: list[Batch] = []
        self.catching_up: asyncio.Task[None] | None = None
        now = time.monotonic()
        if auth.url_has_credential(self.scope.get("query_string", b"")):
            refusals.log(logger, logging.WARNING, "refused_url_credential", "refused: credential in URL")
            counts.refused["url_credential"] += 1
            await self.close()
            return
        if protocol.PROTOCOL not in (self.scope.get("subprotocols") or []):
            refusals.log(
                logger, logging.INFO, "refused_protocol", "refused: subprotocol %s not offered", protocol.PROTOCOL
            )
            counts.refused["protocol"] += 1
            await self.close()
            return
        address = limits.client_address(self.scope)
        throttle = limits.throttle()
        if throttle.blocked(address, now):  # before any database query
            refusals.log(logger, logging.WARNING, "refused_throttled", "refused: too many failed authentications")
            counts.refused["throttled"] += 1
            await self._deny(429)
            return
        batches = handshakes.for_loop(_handshakes)
        try:
            self.principal = await batches.authenticate.submit(self)
        except _Gone:
            self.closed = True
            await self.close()  # daphne dropped the handshake while it waited (a storm): a no-op then
            return
        except auth.AuthRefused as exc:
            throttle.failed(address, time.monotonic())
            refusals.log(logger, logging.INFO, "refused_auth", "refused: %s", exc)
            counts.refused["auth"] += 1
            await self.close()
            return
        except exceptions.StoreUnavailable:
            logger.warning("credential check unavailable: answering 503", extra={"action": "refused_unavailable"})
            counts.refused["unavailable"] += 1
            await self._deny(503)
            return
        server = self.scope.get("server") or (None, None)
        try:
            self.runtime = await EdgeRuntime.get(server[1])
            if self.runtime.draining:
                self.runtime = None
                counts.refused["draining"] += 1
                await self._deny(503)
                return
            p = self.principal
            self.keys = streams.connection_streams(p.tenant_id, p.role, p.device_id)
            # Subscribed before the heads are read: nothing after the hello's heads is missed
            # (batches arriving meanwhile are held, and repeats dropped by the cursors).
            await self.runtime.subscribe(self)
            heads = await batches.open.submit(self)
        except _OverCap as exc:
            self.closed = True
            if self.runtime is not None:
                self.runtime.unsubscribe(self)
            refusals.log(logger, logging.INFO, "refused_cap", "refused: %s connection cap reached", exc)
            counts.refused["cap"] += 1
            await self._deny(429)
            return
        except _Gone:
            self.closed = True
            if self.runtime is not None:
                self.runtime.unsubscribe(self)
            await self.close()  # a no-op for a dropped handshake; never one left pending
            return
        except Exception as exc:
            logger.warning("connect failed: %s", type(exc).__name__, extra={"action": "connect_error"})
            counts.refused["error"] += 1
            self.closed = True
            if self.runtime is not None:
                self.runtime.unsubscribe(self)
            await self._deny(503)
            return
        await self.accept(protocol.PROTOCOL)
        self._direct_writes()
        # One bucket for text frames and WebSocket pings alike (both cost the edge work).
        inbound = TokenBucket(conf.INBOUND_RATE_PER_SEC, float(conf.INBOUND_BURST), time.monotonic())
        vendor_daphne.share_inbound_bucket(self.proto, inbound)
        self.delivery = Delivery(
            self.keys,
            {name: heads[key] for name, key in self.keys.items()},
            max_replay=conf.MAX_REPLAY_EVENTS,
            max_frame_bytes=conf.MAX_INBOUND_FRAME_BYTES,
            inbound=inbound,
        )
        self.delivery.backlog.extend(self.early)  # repeats of the hello's heads are dropped by the cursors
        self.early = []
        hello = {name: protocol.Position(h.epoch, h.offset) for name, h in self.delivery.heads.items()}
        await self.send(text_data=protocol.hello_frame(self.connection_id, self.runtime.edge_id, hello))
        self.runtime.add(self)
        self.hold_task = asyncio.create_task(self._hold_timer())
        counts.accepted += 1
        logger.info("connected %s", self.connection_id, extra={"action": "connected"})

    def _direct_writes(self) -> None:
        """Write frames straight to daphne's transport when it can take them. Frames written
        that way wait for the end of the loop turn (``vendor.daphne.Coalescer``), so anything
        sent the ASGI way (a pong, a close) flushes them first: nothing overtakes them."""
        self.wire = vendor_daphne.direct_wire(self.proto)
        self.coalescer = vendor_daphne.coalescer()
        if self.wire is None:
            return
        asgi_send: Any = self.base_send
        wire, coalescer = self.wire, self.coalescer

        async def ordered_send(message: Any) -> None:
            coalescer.flush(wire)
            await asgi_send(message)

        self.base_send = ordered_send

    def _unless_gone(self, fn: Callable[..., Any], *args: Any) -> Any:
        """(Worker thread) run ``fn(*args)`` unless daphne dropped the peer meanwhile: in a
        connect storm handshakes wait longer than daphne's 5 s connect timeout, and the
        threads would otherwise still do the work of every dropped attempt."""
        if vendor_daphne.gone(self.proto):
            raise _Gone
        return fn(*args)

    async def _asgi(self, message: dict[str, Any]) -> None:
        """Send an ASGI message as it is (channels' stubs type each message kind apart)."""
        send: Any = self.base_send
        await send(message)

    async def _deny(self, status: int) -> None:
        """Refuse the upgrade with an HTTP status (``refusals.deny``)."""
        await refusals.deny(self.scope, self.base_send, status)

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if self.runtime is None or not self.keys:
            return
        self.runtime.remove(self)
        self.runtime.unsubscribe(self)
        for task in (self.hold_task, self.drainer, self.catching_up):
            if task is not None:
                task.cancel()
        if not self.row_written:
            return
        try:
            await edge_db.call(directory.close_connection)(self.connection_id)
        except Exception as exc:  # the heartbeat sweep removes it later
            logger.warning("could not remove connection row: %s", type(exc).__name__, extra={"action": "disconnect"})
        logger.info("disconnected %s code %s", self.connection_id, code, extra={"action": "disconnected"})

    @property
    def store(self) -> Store:
        """The edge runtime's store (the one that reads heads, replays and gap fills)."""
        return self.runtime.store if self.runtime is not None else get_store()

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

    def positions(self, heads: dict[str, Any]) -> dict[str, tuple[int, int]]:
        delivery = getattr(self, "delivery", None)
        if delivery is None or self.closed:
            return {}
        out: dict[str, tuple[int, int]] = {}
        for name, key in self.keys.items():
            head, cursor = heads.get(key), delivery.cursors.get(name)
            if head is not None and cursor is not None:
                out[name] = (cursor.next - 1, max(0, head.offset - cursor.next + 1))
        return out

    async def close_with(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            delivery = getattr(self, "delivery", None)
            if delivery is not None:
                delivery.backlog.clear()  # nothing more goes to this socket
            counts.closes[int(code)] += 1
            await self.close(code=int(code))

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Dispatch, but never leave a half-alive consumer behind: a handler's error closes
        4001 (the peer reconnects and resumes). No ``aclose_old_connections()`` thread hop
        per message, unlike channels': every database call here goes through
        ``database_sync_to_async``, which closes old connections itself
        (docs/decisions/0017-edge-fan-out-one-subscription-per-stream.md)."""
        handler = getattr(self, vendor_channels.get_handler_name(message), None)
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
        if getattr(self, "delivery", None) is not None:
            await self.close_with(Close.RECONNECT)
        else:  # failed before accept
            await self.close()

    # --- inbound frames -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closed:
            return
        for action in self.delivery.frame(text_data, time.monotonic()):
            if isinstance(action, CloseWith):
                await self.close_with(action.code)
                return
            if isinstance(action, Release):
                await self._release()
            elif isinstance(action, Reply):
                await self._send_frame(action.text)
            elif isinstance(action, Resume):
                await self._resume(action)
                await self._release()

    async def _send_frame(self, text: str) -> None:
        if not self.closed:
            await self.send(text_data=text)

    # --- resume -------------------------------------------------------------------------

    async def _resume(self, resume: Resume) -> None:
        async with self.lock:
            result: dict[str, dict[str, Any]] = {}
            for name, position in resume.positions.items():
                plan = self.delivery.replay(name, position)
                if isinstance(plan, Fill):
                    refused = await self._replay(name, plan)
                    if self.closed:
                        return
                    result[name] = refused or protocol.recovered(plan.count)
                else:
                    result[name] = plan
                counts.resumes["recovered" if result[name]["recovered"] else result[name]["reason"]] += 1
            await self._send_frame(protocol.resumed_frame(result))

    async def _replay(self, name: str, plan: Fill) -> dict[str, Any] | None:
        """Send a resume's replay page by page; return the stream's refusal if its first page
        is short (nothing sent), else None (or the socket is closed)."""
        for n, page in enumerate(plan.pages(conf.REPLAY_PAGE_EVENTS)):
            try:
                items = await edge_db.call(self._unless_gone)(
                    self.store.read_range, self.keys[name], page.after, page.upto
                )
            except _Gone:
                self.closed = True
                await self.close(code=int(Close.RECONNECT))  # a no-op if the peer left; never one left waiting
                return None
            checked = self.delivery.replayed_page(page, len(items), first=n == 0)
            if isinstance(checked, CloseWith):
                await self.close_with(checked.code)
                return None
            if checked is not None:
                return checked
            try:
                for item in items:
                    await self._send_text(streams.event_frame(name, plan.epoch, item))
                counts.replayed += len(items)
            except _Closed:
                return None
            if vendor_daphne.closing(self.proto):  # a slow consumer's 4013 is on its way
                self.closed = True
                return None
        return None

    # --- live delivery ------------------------------------------------------------------

    async def _hold_timer(self) -> None:
        await asyncio.sleep(conf.LIVE_HOLD_MS / 1000)
        # The peer's first frame may have arrived in time and still wait to be processed (a
        # busy edge: a failover storm): releasing now would let live events overtake that
        # resume's replay. So the hold lasts while a frame is on its way in — bounded, for a
        # peer that trickles a frame byte by byte (wall time: a busy loop's sleeps run long).
        until = time.monotonic() + HOLD_EXTENSION_SECS
        while (
            not self.delivery.first_frame_seen and time.monotonic() < until and vendor_daphne.frame_pending(self.proto)
        ):
            await asyncio.sleep(HOLD_POLL_SECS)
        for _ in range(3):  # a message just taken off daphne's queue reaches receive() in a turn or two
            if self.delivery.first_frame_seen:
                return  # receive() releases, after a resume's replay
            await asyncio.sleep(0)
        try:
            await self._release()
        except Exception as exc:
            await self._failed(exc)

    async def _release(self) -> None:
        if not self.delivery.holding:
            return
        async with self.lock:
            if self.delivery.release():
                await self._drain_locked()

    def offer(
        self, key: str, name: str, epoch: str, items: list[list[Any]], offsets: Sequence[int], wire: list[bytes]
    ) -> Coroutine[Any, Any, None] | None:
        """A relay batch for one of this socket's streams, from the edge runtime (which built
        ``offsets`` and the frame bytes ``wire`` once for all the stream's sockets).

        What continues the cursor is written at once, with no task or lock; the rest queues
        for the drain task, which may read the outbox — the runtime never waits for it.
        Synchronous on that path (a fan-out calls it once per socket: no coroutine each);
        returns a coroutine for the runtime to await only when a frame must go the ASGI way
        or the socket failed."""
        if self.closed or self.keys.get(name) != key:
            return None
        delivery = getattr(self, "delivery", None)
        if delivery is None:  # still connecting: kept for the Delivery about to be made
            self.early.append((name, epoch, items))
            return None
        try:
            send = delivery.offer(name, epoch, items, offsets, self.lock.locked())
            counts.frames_sent += len(send)
            proto = self.wire
            if send:
                if proto is None:
                    return self._offer_asgi(items, wire, send)
                coalescer = self.coalescer
                write = vendor_daphne.write_direct
                whole = vendor_daphne.joined(wire) if len(send) > 1 and len(send) == len(wire) else None
                if whole is not None:  # the whole batch, its frames' bytes in one write
                    if not write(proto, whole, coalescer):
                        return self._offer_asgi(items, wire, send)
                else:
                    for i, n in enumerate(send):
                        if not write(proto, wire[n], coalescer):
                            return self._offer_asgi(items, wire, send[i:])
        except Exception as exc:
            return self._failed(exc)
        if delivery.backlog:
            self._drain_later(delivery)
        return None

    async def _offer_asgi(self, items: list[list[Any]], wire: list[bytes], send: range) -> None:
        """The rest of ``offer`` once a frame could not be written directly: that one the ASGI
        way (a slow consumer's 4013 starts there), the others directly again if they can."""
        proto = self.wire
        try:
            for n in send:
                if self.closed:  # closed under an earlier frame's send
                    return
                if proto is None or not vendor_daphne.write_direct(proto, wire[n], self.coalescer):
                    await self._asgi({"type": "websocket.send", "text": items[n][1]})
        except Exception as exc:
            await self._failed(exc)
            return
        self._drain_later(self.delivery)

    def _drain_later(self, delivery: Delivery) -> None:
        """Start the drain task when batches wait for the slow path and none is running."""
        if delivery.backlog and not delivery.holding and (self.drainer is None or self.drainer.done()):
            self.drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            async with self.lock:
                await self._drain_locked()
        except Exception as exc:
            await self._failed(exc)

    async def _drain_locked(self) -> None:
        backlog = self.delivery.backlog
        try:
            while backlog and not self.closed:
                await self._deliver(backlog.popleft())
        except _Closed:
            return

    async def _deliver(self, batch: Batch) -> None:
        for step in self.delivery.plan(batch):
            if isinstance(step, str):
                await self._send_text(step)
                counts.frames_sent += 1
            elif isinstance(step, Fill):
                await self._fill(step)
            else:
                await self.close_with(step.code)
                raise _Closed

    async def _fill(self, fill: Fill) -> None:
        """Send a range the peer missed from the outbox, page by page. The cursor is past it
        already: if it cannot be sent, the socket closes so the peer resumes from what it
        really got."""
        for page in fill.pages(conf.REPLAY_PAGE_EVENTS):
            try:
                items = await edge_db.call(self.store.read_range)(self.keys[fill.stream], page.after, page.upto)
            except Exception as exc:
                logger.warning("gap fill failed (%s): closing 4001", type(exc).__name__, extra={"action": "gap_error"})
                await self.close_with(Close.RECONNECT)
                raise _Closed from None
            refused = self.delivery.filled(page, len(items))
            if refused is not None:  # compacted away: the peer must refetch
                logger.warning(
                    "gap %s..%s no longer in the outbox", page.after + 1, page.upto, extra={"action": "gap_lost"}
                )
                await self.close_with(refused.code)
                raise _Closed
            for item in items:
                await self._send_text(streams.event_frame(fill.stream, fill.epoch, item))
            counts.gap_filled_events += len(items)
            if vendor_daphne.closing(self.proto):  # a slow consumer's 4013 is on its way
                self.closed = True
                raise _Closed
        counts.gap_fills += 1
        logger.info("filled %d missed events from the outbox", fill.count, extra={"action": "gap_filled"})

    async def _send_text(self, text: str) -> None:
        """Send one frame of a replay, a gap fill or a queued batch (directly to daphne's
        transport when it can take it: a 10 000-event replay is 10 000 of these)."""
        if self.closed:
            raise _Closed
        if self.wire is not None and vendor_daphne.write_direct(
            self.wire, vendor_daphne.ws_text_frame(text), self.coalescer
        ):
            return
        await self._asgi({"type": "websocket.send", "text": text})

    # --- head checks --------------------------------------------------------------------

    async def observe_heads(self, heads: dict[str, Any]) -> bool:
        """Fill a lag that persists across two head checks (the relay was not just slow:
        the transport lost the tail). The fill runs on a task of this socket's: the head
        check goes on to the other sockets without waiting for its lock or its reads.
        True when the next check must look again whether or not a head moves: a lag seen
        once, live events held, or no cursors yet."""
        if self.closed:
            return False
        if getattr(self, "delivery", None) is None:
            return True
        seen = self.delivery.observe(heads)
        if isinstance(seen, CloseWith):
            await self.close_with(seen.code)
            return False
        if seen and (self.catching_up is None or self.catching_up.done()):
            self.catching_up = asyncio.create_task(self._catch_up(seen))
        return bool(self.delivery.holding or self.delivery.lag_seen)

    async def _catch_up(self, lags: list[Lag]) -> None:
        try:
            for lag in lags:
                async with self.lock:
                    step = self.delivery.catch_up(lag)
                    if isinstance(step, CloseWith):
                        await self.close_with(step.code)
                        return
                    if step is not None:
                        await self._fill(step)
        except _Closed:
            return
        except Exception as exc:
            await self._failed(exc)


# --- handshakes in batches (handshakes.py) ---------------------------------------------------


def _handshakes() -> handshakes.Handshakes:
    return handshakes.Handshakes(_authenticate_batch, _open_batch)


def _authenticate_batch(sockets: Sequence[GatewayConsumer]) -> list[Any]:
    """(Worker thread) the credential checks of sockets arriving together; a socket daphne
    dropped meanwhile (a storm's handshakes can wait past its connect timeout) is skipped."""
    live = [not vendor_daphne.gone(c.proto) for c in sockets]
    scopes: list[Any] = [c.scope for c, ok in zip(sockets, live, strict=True) if ok]
    found = iter(auth.authenticate_many(scopes))
    return [next(found) if ok else _Gone() for ok in live]


def _open_batch(sockets: Sequence[GatewayConsumer]) -> list[Any]:
    """(Worker thread) open sockets that joined their streams' groups: refuse those past a
    cap (each one let in counts against the next), then read their streams' heads (creating
    new streams) and add their directory rows, with a statement each for the whole batch."""
    answers: list[Any] = [None] * len(sockets)
    live = []
    for n, c in enumerate(sockets):
        if vendor_daphne.gone(c.proto):
            answers[n] = _Gone()
        else:
            live.append(n)
    caps = directory.over_caps(
        [(sockets[n].principal.tenant_id, sockets[n].principal.token_id) for n in live],
        conf.MAX_CONNECTIONS_PER_TOKEN,
        conf.MAX_CONNECTIONS_PER_TENANT,
    )
    by_edge: dict[tuple[str, int], list[int]] = {}  # one edge runtime per loop, but keyed to be sure
    for n, over in zip(live, caps, strict=True):
        if over is not None:
            answers[n] = _OverCap(over)
            continue
        runtime = sockets[n].runtime
        assert runtime is not None  # subscribed before opening
        by_edge.setdefault((runtime.edge_id, id(runtime.store)), []).append(n)
    for (edge_id, _), group in by_edge.items():
        store = sockets[group[0]].store
        heads = store.open_streams(
            {key: sockets[n].principal.tenant_id for n in group for key in sockets[n].keys.values()}
        )
        for n in group:
            sockets[n].row_written = True  # from here on, disconnect() removes the row
        directory.open_connections(edge_id, [sockets[n].directory_row() for n in group])
        for n in group:
            answers[n] = heads
    return answers
