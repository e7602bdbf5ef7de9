"""The edge's hand-over of relay batches: a socket still connecting keeps what it is handed
for its Delivery, and one socket's failure never keeps a batch from the others."""

from __future__ import annotations

from typing import Any

from backplane.consumers import GatewayConsumer
from backplane.edge import EdgeRuntime


class Layer:
    async def group_add(self, group: str, channel: str) -> None:
        pass


async def test_offer__a_socket_still_connecting_keeps_its_batches_for_the_delivery() -> None:
    consumer = GatewayConsumer()
    consumer.closed = False
    consumer.keys = {"device": "d:1:x"}
    consumer.early = []
    items = [[1, "frame-1"]]
    await consumer.offer("d:1:x", "device", "e0", items, [1], [b"x"])
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
