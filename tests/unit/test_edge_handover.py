"""The edge's hand-over of relay batches: a socket still connecting keeps what it is handed
for its Delivery, and one socket's failure never keeps a batch from the others."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backplane.consumers import GatewayConsumer
from backplane.edge import EdgeRuntime
from backplane.vendor import daphne as vendor_daphne


class Layer:
    async def group_add(self, group: str, channel: str) -> None:
        pass


async def test_offer__a_socket_still_connecting_keeps_its_batches_for_the_delivery() -> None:
    consumer = GatewayConsumer()
    consumer.closed = False
    consumer.keys = {"device": "d:1:x"}
    consumer.early = []
    items = [[1, "frame-1"]]
    assert consumer.offer("d:1:x", "device", "e0", items, [1], [b"x"]) is None
    assert consumer.early == [("device", "e0", items)]


class Socket:
    def __init__(self, fail: bool = False) -> None:
        self.keys = {"device": "d:1:x"}
        self.fail = fail
        self.got: list[Any] = []

    async def offer(self, key: str, name: str, epoch: str, items: Any, offsets: Any, wire: Any) -> None:
        if self.fail:
            raise AttributeError("not ready")
        self.got.append(offsets)


async def test_deliver__one_sockets_failure_does_not_keep_the_batch_from_the_others() -> None:
    runtime = EdgeRuntime("unit-edge", layer=Layer(), store=object())  # type: ignore[arg-type]
    runtime.stream_channel = "c"
    first, broken, last = Socket(), Socket(fail=True), Socket()
    for s in (first, broken, last):
        await runtime.subscribe(s)  # type: ignore[arg-type]
    await runtime.deliver({"type": "bp.batch", "stream": "d:1:x", "epoch": "e0", "items": [[7, "f"]]})
    assert first.got == [[7]] and last.got == [[7]]


class Transport:
    """The parts of a twisted TCP transport the direct write reads (nothing unsent)."""

    def __init__(self, unsent: bytes = b"") -> None:
        self.dataBuffer = unsent
        self.offset = 0
        self._tempDataLen = 0


class Proto:
    """daphne's protocol as ``write_direct`` sees it: open, no frame half sent."""

    STATE_OPEN = 1
    SEND_STATE_GROUND = 0

    def __init__(self, unsent: bytes = b"") -> None:
        self.state = self.STATE_OPEN
        self.send_state = self.SEND_STATE_GROUND
        self.transport = Transport(unsent)


def open_consumer(proto: Proto, sent: list[Any]) -> GatewayConsumer:
    """A connected consumer past its live hold, its frames written directly to ``proto``."""
    from backplane.delivery import Delivery, TokenBucket
    from backplane.store import Head

    consumer = GatewayConsumer()
    consumer.closed = False
    consumer.keys = {"device": "d:1:x"}
    consumer.early = []
    consumer.drainer = None
    consumer.lock = asyncio.Lock()
    consumer.delivery = Delivery(
        consumer.keys,
        {"device": Head("e0", 0, 1)},
        max_replay=100,
        max_frame_bytes=1000,
        inbound=TokenBucket(10, 10, 0.0),
    )
    consumer.delivery.release()
    consumer.wire = proto
    consumer.coalescer = vendor_daphne.Coalescer(asyncio.get_running_loop())

    async def asgi(message: Any) -> None:
        sent.append(message)

    consumer._asgi = asgi  # type: ignore[method-assign]
    return consumer


async def test_offer__a_batch_that_continues_the_cursor_is_written_directly_with_nothing_to_await(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vendor_daphne, "_FileDescriptor", Transport)
    proto, asgi = Proto(), []
    consumer = open_consumer(proto, asgi)
    items = [[1, "frame-1"], [2, "frame-2"]]
    assert consumer.offer("d:1:x", "device", "e0", items, [1, 2], [b"w1", b"w2"]) is None
    # The whole batch: its frames joined, one write (docs/decisions/0046).
    assert consumer.coalescer.pending[id(proto)][1] == [b"w1w2"] and asgi == []
    consumer.coalescer.pending.clear()  # not sent: the double has no socket


async def test_offer__past_the_slow_consumer_bound_the_rest_goes_the_asgi_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vendor_daphne, "_FileDescriptor", Transport)
    monkeypatch.setattr(vendor_daphne, "outbound_limit", lambda: 10)
    proto, asgi = Proto(unsent=b"x" * 11), []  # twisted holds more than the bound
    consumer = open_consumer(proto, asgi)
    rest = consumer.offer("d:1:x", "device", "e0", [[1, "frame-1"]], [1], [b"w1"])
    assert rest is not None and asgi == []  # nothing sent until the runtime awaits the rest
    await rest
    assert asgi == [{"type": "websocket.send", "text": "frame-1"}]
    assert not consumer.coalescer.pending


async def test_deliver__awaits_what_a_socket_returns_and_nothing_else() -> None:
    runtime = EdgeRuntime("unit-edge", layer=Layer(), store=object())  # type: ignore[arg-type]
    runtime.stream_channel = "c"
    got: list[str] = []

    class Sync:
        keys = {"device": "d:1:x"}

        def offer(self, *args: Any) -> Any:
            got.append("direct")
            return None

    class Rest(Sync):
        def offer(self, *args: Any) -> Any:
            async def rest() -> None:
                got.append("awaited")

            return rest()

    for s in (Sync(), Rest()):
        await runtime.subscribe(s)  # type: ignore[arg-type]
    await runtime.deliver({"type": "bp.batch", "stream": "d:1:x", "epoch": "e0", "items": [[7, "f"]]})
    assert got == ["direct", "awaited"]
