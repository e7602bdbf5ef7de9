"""A busy edge takes what piled up behind a message with it (decision 0046), on the real
Redis pub/sub layer: ``vendor_redis.receive_ready`` takes the messages the layer's reader task
has queued, in order, without waiting (a message it cannot open comes as its exception), and
the runtime hands a stream's batches that continue one another to each socket as one."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from backplane import hoptrace, streams
from backplane.conf import conf
from backplane.edge import EdgeRuntime
from backplane.vendor import channels_redis as vendor_redis

from .helpers import eventually
from .test_redis_security import KEY_A, KEY_OTHER, Socket, make_layer, raw_redis, sealed_token

pytestmark = [pytest.mark.integration]
__all__ = ["raw_redis"]  # the fixture, used by name


def queued(layer: Any, channel: str, n: int) -> Any:
    async def probe() -> bool:
        return bool(layer._get_layer().channels[channel].qsize() >= n)

    return probe


async def test_receive_ready__what_the_reader_queued_in_order_without_waiting(services: None, raw_redis: Any) -> None:
    layer = make_layer([KEY_A])
    try:
        channel = await layer.new_channel()
        await layer.group_add("pileup", channel)
        for n in (1, 2, 3, 4):
            await layer.group_send("pileup", {"type": "x", "n": n})
        await raw_redis.publish(raw_channel_of(layer, "pileup"), sealed_token({"type": "x", "n": -1}, KEY_OTHER))
        await layer.group_send("pileup", {"type": "x", "n": 5})
        await eventually(queued(layer, channel, 6))

        assert (await layer.receive(channel))["n"] == 1
        assert [m["n"] for m in vendor_redis.receive_ready(layer, channel, 3)] == [2, 3, 4]  # at most the limit
        rest = vendor_redis.receive_ready(layer, channel, 10)
        assert isinstance(rest[0], vendor_redis.UNREADABLE) and rest[1]["n"] == 5
        assert vendor_redis.receive_ready(layer, channel, 10) == []  # nothing queued: nothing, at once
        assert vendor_redis.receive_ready(layer, "no-such-channel", 10) == []
        assert vendor_redis.receive_ready(InMemoryChannelLayer(), channel, 10) == []
    finally:
        await layer.flush()


def raw_channel_of(layer: Any, group: str) -> str:
    return str(layer._get_layer()._get_group_channel_name(group))


def relay_batch(key: str, offsets: list[int], epoch: str = "e0") -> dict[str, Any]:
    frame = lambda o: json.dumps({"event": {"payload": {"n": o}}})  # noqa: E731
    return {"type": "bp.batch", "stream": key, "epoch": epoch, "items": [[o, frame(o)] for o in offsets]}


async def pile_up(layer: Any, runtime: EdgeRuntime, raw_redis: Any) -> tuple[Socket, Socket]:
    """Two sockets and, queued on the edge's channel before its loop runs, 7 messages."""
    runtime.stream_channel = await layer.new_channel()
    tenant = uuid.uuid4()
    a, b = Socket(tenant, "dev-a"), Socket(tenant, "dev-b")
    await runtime.subscribe(a)
    await runtime.subscribe(b)
    key_a, key_b = a.keys["device"], b.keys["device"]
    group = lambda key: streams.group_name(conf.channel_prefix, key)  # noqa: E731
    # As a relay sends them while the edge is busy: a's 1–2, b's 1, a's 3, something no key
    # opens, one that is no batch, a's 5 (a gap: left for the delivery core to fill), b's 1
    # again under a new epoch (its offsets start over).
    sends: list[tuple[str, dict[str, Any]]] = [
        (key_a, relay_batch(key_a, [1, 2])),
        (key_b, relay_batch(key_b, [1])),
        (key_a, relay_batch(key_a, [3])),
        (key_a, relay_batch(key_a, [5])),
        (key_b, relay_batch(key_b, [1], epoch="e1")),
    ]
    for key, message in sends[:3]:
        await layer.group_send(group(key), message)
    await raw_redis.publish(raw_channel_of(layer, group(key_a)), sealed_token(relay_batch(key_a, [4]), KEY_OTHER))
    # Opened with our key, yet no batch at all: dropped alone, the loop goes on.
    malformed = {"type": "bp.batch", "stream": key_a, "epoch": "e0", "items": {"4": "x"}}
    await raw_redis.publish(raw_channel_of(layer, group(key_a)), sealed_token(malformed, KEY_A))
    for key, message in sends[3:]:
        await layer.group_send(group(key), message)
    await eventually(queued(layer, runtime.stream_channel, 7))  # all of it waits before the loop runs
    return a, b


async def run_batches_until_offered(runtime: EdgeRuntime, a: Socket, b: Socket) -> None:
    task = asyncio.create_task(runtime._batches())
    try:
        await eventually(lambda: asyncio.sleep(0, len(a.offered) == 2 and len(b.offered) == 2))
        await asyncio.sleep(0.05)  # the traced edge notes each batch's write in a later turn
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_edge__batches_piled_up_behind_one_reach_each_socket_joined(services: None, raw_redis: Any) -> None:
    layer = make_layer([KEY_A])
    runtime = EdgeRuntime("edge-pileup", layer=layer)
    try:
        a, b = await pile_up(layer, runtime, raw_redis)
        await run_batches_until_offered(runtime, a, b)
        key_a, key_b = a.keys["device"], b.keys["device"]
        assert a.offered == [(key_a, [1, 2, 3], [1, 2, 3]), (key_a, [5], [5])]
        assert b.offered == [(key_b, [1], [1]), (key_b, [1], [1])]  # the new epoch's batch on its own
        assert runtime.rejected == 1
    finally:
        await layer.flush()


async def test_edge__traced_the_pile_goes_the_same_way_each_batch_with_its_first_messages_read_time(
    services: None, raw_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/hop_trace.py's edge delivers as the untraced one (joined), and notes for each
    batch when its first message came off Redis (one read time per message, in order)."""
    records: list[tuple[dict[str, float], list[tuple[str, int]]]] = []
    monkeypatch.setattr(hoptrace, "ON", True)
    monkeypatch.setattr(hoptrace, "record", lambda role, steps, rows: records.append((steps, rows)))
    layer = make_layer([KEY_A])
    runtime = EdgeRuntime("edge-pileup-traced", layer=layer)
    try:
        a, b = await pile_up(layer, runtime, raw_redis)
        # The layer probe's read times of the 7 messages, as it would have noted them.
        monkeypatch.setitem(
            hoptrace.reads, runtime.stream_channel, collections.deque([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        )
        await run_batches_until_offered(runtime, a, b)
        key_a, key_b = a.keys["device"], b.keys["device"]
        assert a.offered == [(key_a, [1, 2, 3], [1, 2, 3]), (key_a, [5], [5])]
        assert b.offered == [(key_b, [1], [1]), (key_b, [1], [1])]
        # In the order delivered (b's new epoch restarts at the same offset: its own read).
        assert [(rows, steps["read"]) for steps, rows in records] == [
            ([(key_a, 1), (key_a, 2), (key_a, 3)], 1.0),  # joined: its first message's read
            ([(key_b, 1)], 2.0),
            ([(key_a, 5)], 6.0),  # after the forged (4.0) and the malformed (5.0) messages
            ([(key_b, 1)], 7.0),
        ]
        assert all(s["received"] <= s["offered"] <= s["written"] for s, _ in records)
        assert not hoptrace.reads[runtime.stream_channel]  # every read time taken, none left to skew the next
    finally:
        await layer.flush()
