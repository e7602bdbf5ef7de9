"""The edge in this process: the real ASGI routing (``backplane.routing``), consumer and edge
runtime, on the in-memory channel layer, driven by channels' ``WebsocketCommunicator`` — no
server, no Redis; and a real ``Relay`` forwarding through that layer.

Tests drive it through the ASGI interface and wire frames only (``AsgiPeer`` reads like
``harness.peer.Peer``). ``stop_edge_runtime`` is the one place that knows how the runtime
of an event loop is found and stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.testing import WebsocketCommunicator

from harness.data import orm
from harness.peer import FRAME_TIMEOUT, PROTOCOL, Frames, PeerClosed, b64url

IN_MEMORY_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Relay cycles per ``forward`` at most (each forwards up to RELAY_BATCH_SIZE rows).
MAX_RELAY_CYCLES = 50
# daphne answers an upgrade the application closed before accepting with this status.
CLOSED_BEFORE_ACCEPT_STATUS = 403


# The Host the peers send (in ALLOWED_HOSTS of every configuration the tests run with).
HOST = "127.0.0.1"


def application() -> Any:
    """The WebSocket side of ``tyrum.asgi.application``: its Host check, URL routing and
    consumer (``backplane.asgi.websocket_application``)."""
    from backplane.asgi import websocket_application

    return websocket_application()


class Refused(Exception):
    """Raised by ``AsgiPeer.open`` when the upgrade is refused; ``status`` is the HTTP status
    daphne would answer with."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class AsgiPeer(Frames):
    """A ``tyrum-v1`` peer talking to the ASGI application in this process."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        super().__init__()
        self.communicator = communicator
        self.subprotocol: str | None = None
        self.gone = False

    @classmethod
    async def open(
        cls,
        token: str | None = None,
        *,
        path: str = "/ws",
        auth: str = "header",
        subprotocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        read_hello: bool = True,
    ) -> AsgiPeer:
        """Connect (raising ``Refused`` with the HTTP status if the upgrade is refused) and read
        the hello. The arguments are ``Peer.open``'s."""
        offered = list(subprotocols) if subprotocols is not None else [PROTOCOL]
        extra = {"Host": HOST, **(headers or {})}
        if token is not None:
            if auth == "header":
                extra["Authorization"] = f"Bearer {token}"
            else:
                offered.append(f"tyrum-auth.{b64url(token)}")
        raw = [(name.lower().encode(), value.encode()) for name, value in extra.items()]
        communicator = WebsocketCommunicator(application(), path, headers=raw, subprotocols=offered)
        # Like daphne with backplane's patch, this "server" answers refusals with their status.
        communicator.scope["extensions"] = {"websocket.http.response": {}}
        peer = cls(communicator)
        await peer.communicator.send_input({"type": "websocket.connect"})
        reply = await peer._output(FRAME_TIMEOUT)
        if reply["type"] != "websocket.accept":
            await peer.close()
            raise Refused(reply.get("status", CLOSED_BEFORE_ACCEPT_STATUS))
        peer.subprotocol = reply.get("subprotocol")
        if read_hello:
            await peer.read_hello()
        return peer

    async def _output(self, timeout: float) -> dict[str, Any]:
        """The application's next message. Not ``receive_output``: its timeout kills the application."""
        try:
            return await asyncio.wait_for(self.communicator.output_queue.get(), timeout)
        except TimeoutError:
            if self.communicator.future.done():
                self.communicator.future.result()  # the application's own error, if it failed
            raise

    async def _next_text(self, timeout: float) -> str:
        if self.close_code is not None:
            raise PeerClosed(self.close_code)
        message = await self._output(timeout)
        if message["type"] == "websocket.close":
            self.close_code = int(message.get("code") or 1000)
            raise PeerClosed(self.close_code)
        assert message["type"] == "websocket.send", message
        assert message.get("text") is not None, "the server sends text frames only"
        return str(message["text"])

    async def send(self, frame: Any) -> None:
        """Send a text frame (``str``, or a dict as JSON) or a binary one (``bytes``)."""
        if isinstance(frame, bytes):
            await self.communicator.send_input({"type": "websocket.receive", "bytes": frame})
        else:
            text = frame if isinstance(frame, str) else json.dumps(frame)
            await self.communicator.send_input({"type": "websocket.receive", "text": text})

    async def ping(self) -> None:
        """Send a ping and read up to its pong (a first frame also ends the live hold)."""
        await self.send({"type": "ping"})
        await self.until(lambda p: p.frames[-1:] == [{"type": "pong"}], timeout=FRAME_TIMEOUT, what="pong")

    async def close(self) -> None:
        """Leave as a peer whose socket closed: the application's disconnect runs (bounded)."""
        if self.gone:
            return
        self.gone = True
        with contextlib.suppress(Exception):
            await self.communicator.send_input({"type": "websocket.disconnect", "code": 1000})
        with contextlib.suppress(TimeoutError):
            await self.communicator.wait(FRAME_TIMEOUT)


class RelayLayer:
    """The channel layer a test's relay sends through: the edge's in-memory layer, recording
    every group message (``sent``) and losing them while ``lose`` is set, as an at-most-once
    transport may."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.lose = False

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.sent.append((group, message))
        if not self.lose:
            await self.inner.group_send(group, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class InProcessEdge:
    """One edge in this process (``edge_id``) and a relay forwarding to it on demand."""

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.peers: list[AsgiPeer] = []
        self.layer: RelayLayer | None = None
        self._relay: Any = None

    async def connect(self, token: str | None = None, **kw: Any) -> AsgiPeer:
        """Open a peer (``AsgiPeer.open``'s arguments); it is closed with the edge."""
        peer = await AsgiPeer.open(token, **kw)
        self.peers.append(peer)
        return peer

    async def refused_status(self, token: str | None = None, **kw: Any) -> int:
        """Try to open a peer; return the HTTP status the upgrade was refused with."""
        try:
            peer = await AsgiPeer.open(token, **kw)
        except Refused as exc:
            return exc.status
        await peer.close()
        raise AssertionError("the upgrade was accepted")

    async def forward(self, *, lose: bool = False) -> int:
        """Run relay cycles until nothing is left to assign or send; return the rows forwarded.

        ``lose``: the group messages of these cycles are lost in transport (the rows are
        marked forwarded all the same)."""
        from channels.layers import get_channel_layer

        from backplane.relay import Relay

        if self._relay is None:
            self.layer = RelayLayer(get_channel_layer())
            self._relay = Relay(self.layer, holder=f"relay-of-{self.edge_id}")
        assert self.layer is not None
        self.layer.lose = lose
        forwarded = 0
        try:
            for _ in range(MAX_RELAY_CYCLES):
                assigned, sent = await self._relay.cycle()
                forwarded += sent
                if not assigned and not sent:
                    break
            else:
                raise AssertionError(f"the relay still had rows after {MAX_RELAY_CYCLES} cycles")
            await self._relay.flush_marks()
        finally:
            self.layer.lose = False
        return forwarded

    async def send_again(self) -> int:
        """Send every group message the relay sent so far once more (a relay that died
        before marking its rows forwarded, and the next one); return how many."""
        assert self.layer is not None, "nothing forwarded yet"
        sent = list(self.layer.sent)
        for group, message in sent:
            await self.layer.inner.group_send(group, message)
        return len(sent)

    async def aclose(self) -> None:
        for peer in self.peers:
            await peer.close()
        if self._relay is not None:
            await self._relay.aclose()
        await stop_edge_runtime()
        await orm(_forget_edge, self.edge_id)


def _forget_edge(edge_id: str) -> None:
    from backplane.models import Connection, Edge

    Connection.objects.filter(edge_id=edge_id).delete()
    Edge.objects.filter(edge_id=edge_id).delete()


async def stop_edge_runtime() -> None:
    """Stop the edge runtime of the running event loop, as the end of its process would.

    The one place that knows how a runtime is found and stopped: ``EdgeRuntime._by_loop``
    and its ``tasks``. (A test's event loop closes after the test: its runtime must not
    outlive it, nor be found by the next test's loop.)"""
    from backplane.edge import EdgeRuntime

    runtime = EdgeRuntime._by_loop.pop(asyncio.get_running_loop(), None)
    if runtime is None:
        return
    for task in runtime.tasks:
        task.cancel()
    await asyncio.gather(*runtime.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_edge() -> AsyncIterator[InProcessEdge]:
    """An ``InProcessEdge`` for one test; its peers, relay and runtime are stopped after it.

    The caller sets ``CHANNEL_LAYERS`` to ``IN_MEMORY_LAYERS`` (a fresh layer per test) and
    ``EDGE_ID`` to ``new_edge_id()`` first. The runtime installs a SIGTERM handler (an edge
    drains on SIGTERM); the test process's own is put back."""
    from django.conf import settings

    previous = signal.getsignal(signal.SIGTERM)
    edge = InProcessEdge(settings.EDGE_ID)
    try:
        yield edge
    finally:
        try:
            await edge.aclose()
        finally:
            signal.signal(signal.SIGTERM, previous)


def new_edge_id() -> str:
    return f"unit-{uuid.uuid4().hex[:12]}"
