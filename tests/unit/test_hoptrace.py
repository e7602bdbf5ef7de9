"""The hop trace (bench/hop_trace.py): off, nothing is noted; on, the edge notes each batch's
steps in order and still delivers it, and the lines hold stream keys, offsets and times only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from backplane import edge, hoptrace
from backplane.edge import EdgeRuntime

KEY = "d:0123456789abcdef0123456789abcdef:dev-1"


class Socket:
    def __init__(self) -> None:
        self.keys = {"device": KEY}
        self.got: list[list[int]] = []

    async def offer(self, key: str, name: str, epoch: str, items: Any, offsets: Any, wire: Any) -> None:
        self.got.append(list(offsets))


def batch() -> dict[str, Any]:
    frame = '{"type":"event","payload":{"secret":"do-not-trace"}}'
    return {"type": "bp.batch", "stream": KEY, "epoch": "e1", "items": [[7, frame], [8, frame]]}


async def test_traced_delivery__notes_each_step_in_order_and_delivers(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("TYRUM_HOP_TRACE", str(tmp_path))
    monkeypatch.setattr(hoptrace, "ON", True)
    runtime = EdgeRuntime("unit-edge")
    runtime.stream_channel = "chan"
    sock = Socket()
    runtime.members[KEY] = {sock: None}  # type: ignore[dict-item]
    await runtime._traced({**batch(), edge.HOP_READ: 1.0, edge.HOP_DECODE: 0.002})  # as its loop noted them
    await asyncio.sleep(0)  # the "written" step runs at the end of the loop turn
    hoptrace.flush("edge")
    assert sock.got == [[7, 8]]
    (path,) = tmp_path.glob("edge-*.jsonl")
    text = path.read_text()
    assert "do-not-trace" not in text
    line = json.loads(text)
    assert line["rows"] == [[KEY, 7], [KEY, 8]]
    t = line["t"]
    assert t["read"] == 1.0 and t["decode_s"] == 0.002
    assert t["read"] <= t["received"] <= t["offered"] <= t["written"]


def test_off__the_edge_delivery_loop_does_not_trace() -> None:
    # The flag is read once at import; the tests run without TYRUM_HOP_TRACE.
    assert hoptrace.ON is False


@pytest.fixture(autouse=True)
def _clean() -> Any:
    yield
    hoptrace.reads.clear()
    hoptrace._lines.clear()
    hoptrace.watched.clear()


def test_layer_probes__note_reads_of_the_watched_channel_and_decode_times(monkeypatch: Any) -> None:
    from channels_redis.pubsub import RedisPubSubChannelLayer, RedisSingleShardConnection

    # The probe patches the class: put it back after this test.
    monkeypatch.setattr(RedisSingleShardConnection, "_receive_message", RedisSingleShardConnection._receive_message)
    monkeypatch.setattr(RedisSingleShardConnection, "_tyrum_traced", False, raising=False)

    from backplane.conf import channel_layers

    config = channel_layers("redis://127.0.0.1:6379", prefix="trace", keys=["trace-test-key-0123456789abcdefghijklmn"])
    layer = RedisPubSubChannelLayer(**config["default"]["CONFIG"])
    hoptrace.install_layer_probes(layer, "delivery")

    class LoopLayer:
        channels = {"delivery": asyncio.Queue(), "commands": asyncio.Queue()}  # type: ignore[var-annotated]
        groups = {"trace:__group__stream": {"delivery"}, "trace:__group__edge": {"commands"}}

    shard = RedisSingleShardConnection("redis://127.0.0.1:6379", LoopLayer())
    shard._receive_message({"channel": b"trace:__group__stream", "data": b"sealed"})
    shard._receive_message({"channel": b"trace:__group__edge", "data": b"command"})
    assert len(hoptrace.reads["delivery"]) == 1 and "commands" not in hoptrace.reads  # commands are not noted
    assert LoopLayer.channels["delivery"].get_nowait() == b"sealed"  # still queued as before
    assert hoptrace.read_time("delivery") > 0 and hoptrace.read_time("delivery") == 0.0
    message = {"type": "bp.batch", "items": []}
    assert layer.deserialize(layer.serialize(message)) == message
    assert hoptrace.last_decode > 0


def test_hoptrace__a_traced_ring_carries_its_send_time_and_a_plain_one_only_shards(monkeypatch):
    from backplane import doorbell

    monkeypatch.setattr(hoptrace, "ON", False)
    assert doorbell._message("3") == "3"
    assert doorbell._sent_at(b"3") == 0.0
    monkeypatch.setattr(hoptrace, "ON", True)
    message = doorbell._message("3,5")
    assert message.startswith("3,5@")
    assert abs(doorbell._sent_at(message.encode()) - float(message.split("@")[1])) < 1e-9
    assert doorbell._sent_at(b"3@garbage") == 0.0 and doorbell._sent_at(None) == 0.0


async def test_hoptrace__the_lag_probe_notes_a_blocked_loop_and_resets_when_taken():
    import time

    hoptrace.take_lag()
    hoptrace.start_lag_probe()
    await asyncio.sleep(0.01)
    time.sleep(0.05)  # the loop blocked: the probe wakes late by about as much
    await asyncio.sleep(0.01)
    assert hoptrace.take_lag() >= 0.04
    assert hoptrace.take_lag() == 0.0
    for task in list(hoptrace._tasks):
        task.cancel()
    hoptrace._tasks.clear()
