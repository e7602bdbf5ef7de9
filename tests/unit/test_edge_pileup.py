"""Unit tests of what a busy edge does with relay batches that piled up behind one another
(docs/decisions/0046-edge-delivers-what-piled-up-together.md): a stream's batches that continue
one another are joined (``edge.joined_batches``), and a socket that takes a whole batch of
several frames gets their bytes in one write (``GatewayConsumer.offer``, ``vendor_daphne.joined``)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from backplane import edge
from backplane.consumers import GatewayConsumer
from backplane.delivery import Delivery, TokenBucket
from backplane.edge import joined_batches
from backplane.vendor import daphne as vendor_daphne


def batch(stream: str, offsets: list[int], epoch: str = "e0", **extra: Any) -> dict[str, Any]:
    return {
        "type": "bp.batch",
        "stream": stream,
        "epoch": epoch,
        "items": [[o, f"{stream}:{o}"] for o in offsets],
        **extra,
    }


def offsets(messages: list[Any]) -> list[tuple[str, list[int]]]:
    return [(m["stream"], [int(o) for o, _ in m["items"]]) for m in messages]


def test_joined__a_streams_batches_that_continue_one_another_become_one_in_order() -> None:
    got = joined_batches([batch("a", [1, 2]), batch("a", [3]), batch("a", [4, 5])])
    assert offsets(got) == [("a", [1, 2, 3, 4, 5])]
    assert [frame for _, frame in got[0]["items"]] == ["a:1", "a:2", "a:3", "a:4", "a:5"]


def test_joined__streams_interleaved_each_joined_at_its_first_place() -> None:
    got = joined_batches([batch("a", [1]), batch("b", [7]), batch("a", [2]), batch("b", [8]), batch("c", [1])])
    assert offsets(got) == [("a", [1, 2]), ("b", [7, 8]), ("c", [1])]


@pytest.mark.parametrize(
    "second",
    [
        batch("a", [4]),  # a gap: the delivery core fills it from the outbox
        batch("a", [2]),  # a repeat
        batch("a", [3], epoch="e1"),  # a new epoch: the sockets close 4409
        {"type": "bp.batch", "stream": "a", "epoch": "e0", "items": []},
        {"type": "bp.other", "stream": "a", "epoch": "e0", "items": [[3, "x"]]},
        {"type": "bp.batch", "stream": "a", "epoch": "e0", "items": [["not an offset", "x"]]},
    ],
)
def test_joined__anything_that_does_not_continue_stays_as_it_came(second: dict[str, Any]) -> None:
    first = batch("a", [1, 2])
    got = joined_batches([first, second, batch("b", [1])])
    assert got == [first, second, batch("b", [1])]


def test_joined__a_later_batch_continues_the_streams_latest_not_an_earlier_one() -> None:
    got = joined_batches([batch("a", [1, 2]), batch("a", [5]), batch("a", [6]), batch("a", [3]), batch("a", [7])])
    assert offsets(got) == [("a", [1, 2]), ("a", [5, 6]), ("a", [3]), ("a", [7])]  # the stream's order kept


def test_joined__a_joined_batch_holds_at_most_joined_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "JOINED_ITEMS", 3)
    got = joined_batches([batch("a", [1, 2]), batch("a", [3]), batch("a", [4]), batch("a", [5])])
    assert offsets(got) == [("a", [1, 2, 3]), ("a", [4, 5])]


def test_joined__the_messages_given_are_not_changed() -> None:
    first, second = batch("a", [1]), batch("a", [2])
    joined_batches([first, second])
    assert first == batch("a", [1]) and second == batch("a", [2])


def test_vendor_joined__a_batchs_frames_joined_once_and_never_another_batchs() -> None:
    one, two = [b"ab", b"cd"], [b"ab", b"cd"]
    assert vendor_daphne.joined(one) == b"abcd"
    assert vendor_daphne.joined(one) is vendor_daphne.joined(one)  # made once for the batch
    assert vendor_daphne.joined(two) == b"abcd" and vendor_daphne.joined([b"x", b"y"]) == b"xy"


class Proto:
    """daphne's protocol as ``write_direct`` sees it; the writes themselves are recorded."""


def consumer_with_cursor(monkeypatch: pytest.MonkeyPatch) -> tuple[GatewayConsumer, list[bytes]]:
    writes: list[bytes] = []

    def write_direct(proto: Any, data: bytes, coalescer: Any) -> bool:
        writes.append(data)
        return True

    monkeypatch.setattr(vendor_daphne, "write_direct", write_direct)
    consumer = GatewayConsumer()
    consumer.closed = False
    consumer.lock = asyncio.Lock()
    consumer.keys = {"tenant": "t:1"}
    heads = {"tenant": types.SimpleNamespace(epoch="e0", offset=0, first_retained=1)}
    delivery = Delivery(
        consumer.keys, heads, max_replay=1000, max_frame_bytes=1024, inbound=TokenBucket(20.0, 60, now=0.0)
    )
    delivery.release()
    consumer.delivery = delivery
    consumer.wire = Proto()
    consumer.coalescer = None  # type: ignore[assignment]
    return consumer, writes


async def test_offer__a_whole_batch_of_several_frames_is_one_write_of_them_joined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, writes = consumer_with_cursor(monkeypatch)
    items = [[1, "one"], [2, "two"], [3, "three"]]
    wire = [b"F1", b"F2", b"F3"]
    assert consumer.offer("t:1", "tenant", "e0", items, [1, 2, 3], wire) is None
    assert writes == [b"F1F2F3"]
    # A batch only partly new (a repeat first): its new frames one by one, as before.
    assert (
        consumer.offer(
            "t:1", "tenant", "e0", [[3, "three"], [4, "four"], [5, "five"]], [3, 4, 5], [b"F3", b"F4", b"F5"]
        )
        is None
    )
    assert writes == [b"F1F2F3", b"F4", b"F5"]
    await asyncio.sleep(0)


def test_vendor_joined__frames_past_flush_bytes_are_not_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vendor_daphne.Coalescer, "FLUSH_BYTES", 4)
    assert vendor_daphne.joined([b"ab", b"cd"]) == b"abcd"
    assert vendor_daphne.joined([b"ab", b"cde"]) is None


async def test_offer__a_whole_batch_past_flush_bytes_goes_frame_by_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, writes = consumer_with_cursor(monkeypatch)
    monkeypatch.setattr(vendor_daphne.Coalescer, "FLUSH_BYTES", 4)
    assert (
        consumer.offer("t:1", "tenant", "e0", [[1, "a"], [2, "b"], [3, "c"]], [1, 2, 3], [b"F1", b"F2", b"F3"]) is None
    )
    assert writes == [b"F1", b"F2", b"F3"]


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "bp.batch", "stream": "a", "items": [[3, "x"]]},  # no epoch
        {"type": "bp.batch", "stream": "a", "epoch": "e0", "items": {"3": "x"}},
        {"type": "bp.batch", "stream": "a", "epoch": "e0", "items": 3},
        {"type": "bp.batch", "stream": "a", "epoch": "e0", "items": [[3, "x"], "junk", [5, "y"]]},
        {"type": "bp.batch", "stream": ["a"], "epoch": "e0", "items": [[3, "x"]]},
        "not a message",
    ],
)
def test_joined__a_malformed_message_in_a_pile_up_stays_alone_and_raises_nothing(bad: Any) -> None:
    got = joined_batches([batch("a", [1, 2]), bad, batch("a", [3]), bad])
    assert got == [{**batch("a", [1, 2, 3]), edge.JOINED_LASTS: ["a:2"]}, bad, bad]


def test_joined__a_joined_batch_names_the_last_frame_of_each_batch_joined_before_its_end() -> None:
    (got,) = joined_batches([batch("a", [1, 2]), batch("a", [3]), batch("a", [4, 5])])
    assert got[edge.JOINED_LASTS] == ["a:2", "a:3"]  # with items[-1] ("a:5"): one sample per relay batch


async def test_offer__a_refused_joined_write_sends_every_frame_once_the_asgi_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, writes = consumer_with_cursor(monkeypatch)
    monkeypatch.setattr(vendor_daphne, "write_direct", lambda proto, data, coalescer: writes.append(data) and False)
    sent: list[str] = []

    async def asgi(message: dict[str, Any]) -> None:
        sent.append(message["text"])

    consumer._asgi = asgi  # type: ignore[method-assign]
    consumer.drainer = None
    rest = consumer.offer("t:1", "tenant", "e0", [[1, "a"], [2, "b"], [3, "c"]], [1, 2, 3], [b"F1", b"F2", b"F3"])
    assert rest is not None
    await rest
    assert writes[0] == b"F1F2F3"  # tried whole first, refused
    assert sent == ["a", "b", "c"]  # then each frame once, in order
