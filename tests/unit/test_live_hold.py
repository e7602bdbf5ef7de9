"""Unit tests of the live hold (PROTOCOL.md: live events wait for a new connection's first
frame, or LIVE_HOLD_MS): a first frame that arrived in time but waits to be processed (a
busy edge) keeps the hold, so a resume's replay is never overtaken by live events."""

from __future__ import annotations

import asyncio
import functools
import socket
import types
from typing import Any

import pytest

from backplane import consumers
from backplane.consumers import GatewayConsumer
from backplane.vendor import daphne as vendor_daphne


class Transport:
    def __init__(self, sock: socket.socket | None = None) -> None:
        self.socket = sock


class Protocol:
    """The parts of daphne's WebSocket protocol object the hold looks at."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.application_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.data = b""
        self.transport = Transport(sock)


async def handle_reply(protocol: Protocol, message: dict[str, Any]) -> None:
    pass


def held_consumer(proto: Protocol) -> tuple[GatewayConsumer, list[float]]:
    consumer = GatewayConsumer()
    consumer.base_send = functools.partial(handle_reply, proto)
    consumer.proto = vendor_daphne.protocol_of(consumer.base_send)
    consumer.delivery = types.SimpleNamespace(first_frame_seen=False)  # type: ignore[assignment]
    released: list[float] = []

    async def release() -> None:
        released.append(asyncio.get_running_loop().time())

    consumer._release = release  # type: ignore[method-assign]
    return consumer, released


@pytest.fixture
def short_hold(settings: Any) -> None:
    settings.BACKPLANE = {**getattr(settings, "BACKPLANE", {}), "LIVE_HOLD_MS": 20}


async def test_hold__released_after_live_hold_ms_when_the_peer_sent_nothing(short_hold: None) -> None:
    consumer, released = held_consumer(Protocol())
    await asyncio.wait_for(consumer._hold_timer(), 2)
    assert len(released) == 1


async def test_hold__kept_while_the_first_frame_waits_in_daphnes_queue(short_hold: None) -> None:
    proto = Protocol()
    proto.application_queue.put_nowait({"type": "websocket.receive", "text": '{"type":"resume"}'})
    consumer, released = held_consumer(proto)
    timer = asyncio.create_task(consumer._hold_timer())
    await asyncio.sleep(0.2)  # ten times the hold: the edge is busy, the frame not yet dispatched
    assert released == [] and not timer.done()
    proto.application_queue.get_nowait()  # dispatched: receive() marks the first frame
    consumer.delivery.first_frame_seen = True
    await asyncio.wait_for(timer, 2)
    assert released == []  # receive() releases, after the replay; the timer must not


async def test_hold__kept_while_a_partial_frame_is_buffered_then_released_at_the_bound(
    short_hold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumers, "HOLD_EXTENSION_SECS", 0.1)
    proto = Protocol()
    proto.data = b"\x81\xfe"  # a frame's first bytes; the rest never comes
    consumer, released = held_consumer(proto)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(consumer._hold_timer(), 2)
    assert len(released) == 1
    assert released[0] - started >= 0.1  # held past LIVE_HOLD_MS, released at the bound


async def test_hold__kept_while_bytes_wait_unread_in_the_kernel(short_hold: None) -> None:
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        peer.sendall(b"\x81\x05hello")
        proto = Protocol(ours)
        consumer, released = held_consumer(proto)
        timer = asyncio.create_task(consumer._hold_timer())
        await asyncio.sleep(0.2)
        assert released == [] and not timer.done()
        assert ours.recv(64) == b"\x81\x05hello"  # read (peeking left it there): nothing pending now
        await asyncio.wait_for(timer, 2)
        assert len(released) == 1
    finally:
        ours.close()
        peer.close()


def test_frame_pending__false_when_not_under_daphne() -> None:
    assert vendor_daphne.frame_pending(None) is False
    assert vendor_daphne.protocol_of(lambda message: None) is None


async def test_dispatch__messages_go_to_the_handlers_in_order_from_the_consumers_own_task() -> None:
    """The consumer awaits daphne's queue itself: no task per message, and a message taken
    off the queue is already in its handler (what the hold's frame probe relies on)."""
    seen: list[str] = []
    waiting: list[int] = []
    sent: list[dict[str, Any]] = []
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    class Recording(GatewayConsumer):
        async def websocket_connect(self, message: dict[str, Any]) -> None:
            seen.append("connect")

        async def websocket_receive(self, message: dict[str, Any]) -> None:
            seen.append(message["text"])
            waiting.append(queue.qsize())  # the next one still waits in daphne's queue

        async def disconnect(self, code: int) -> None:
            seen.append(f"disconnect {code}")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.ensure_future(Recording()({"type": "websocket"}, queue.get, send))
    for message in ({"type": "websocket.connect"}, {"type": "websocket.receive", "text": "a"}):
        queue.put_nowait(message)
    queue.put_nowait({"type": "websocket.receive", "text": "b"})
    for _ in range(20):  # bounded: a few loop turns
        await asyncio.sleep(0)
        if len(seen) == 2:
            break
    assert seen[:2] == ["connect", "a"]
    assert len(asyncio.all_tasks()) == 2  # this test's and the consumer's: no receive task
    queue.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(task, 5)  # the disconnect ends it (StopConsumer)
    assert seen == ["connect", "a", "b", "disconnect 1000"] and waiting == [1, 0] and sent == []
