"""The hop trace (bench/hop_trace.py): off, nothing is noted; on, the edge notes each batch's
steps in order and still delivers it, and the lines hold stream keys, offsets and times only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from backplane import hoptrace
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
    hoptrace.reads["chan"].append(1.0)
    await runtime._traced(batch())
    await asyncio.sleep(0)  # the "written" step runs at the end of the loop turn
    hoptrace.flush("edge")
    assert sock.got == [[7, 8]]
    (path,) = tmp_path.glob("edge-*.jsonl")
    text = path.read_text()
    assert "do-not-trace" not in text
    line = json.loads(text)
    assert line["rows"] == [[KEY, 7], [KEY, 8]]
    t = line["t"]
    assert t["read"] == 1.0
    assert t["read"] <= t["received"] <= t["offered"] <= t["written"]


def test_off__the_edge_delivery_loop_does_not_trace() -> None:
    # The flag is read once at import; the tests run without TYRUM_HOP_TRACE.
    assert hoptrace.ON is False


@pytest.fixture(autouse=True)
def _clean() -> Any:
    yield
    hoptrace.reads.clear()
    hoptrace._lines.clear()
