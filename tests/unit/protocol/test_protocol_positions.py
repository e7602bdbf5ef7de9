"""Where each peer stands (issue 16, point 6): the edge's heartbeat writes each connection's
last delivered offset and lag per stream into its directory row — from the heads the head
check already read, only for the peers that moved, never per event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from backplane import metrics
from harness.data import events, make_tenant, make_token, orm, publish_many
from harness.inprocess import InProcessEdge


@pytest.fixture
def fast_beat(settings: Any) -> Iterator[None]:
    """A heartbeat of 0.3 s (the runtime reads the interval at each beat: set before it starts)."""
    settings.BACKPLANE = {
        **getattr(settings, "BACKPLANE", {}),
        "HEARTBEAT_INTERVAL_SECS": 0.3,
        "HEAD_CHECK_INTERVAL_SECS": 0.1,
        "CONNECTION_TTL_SECS": 5.0,
    }
    yield


def positions_of(connection_id: str) -> Any:
    from backplane.models import Connection

    row = Connection.objects.filter(connection_id=connection_id).first()
    return row.positions if row is not None else None


async def wait_positions(connection_id: str, want: dict[str, list[int]], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    got = None
    while asyncio.get_running_loop().time() < deadline:
        got = await orm(positions_of, connection_id)
        if got and all(got.get(name) == where for name, where in want.items()):
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"positions are {got}, not {want}")


async def test_positions__the_heartbeat_writes_where_each_peer_stands(fast_beat: None, edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    peer = await edge.connect(await orm(make_token, tenant, "dev-pos"))
    await peer.ping()
    connection_id = peer.hello["connection_id"]
    await wait_positions(connection_id, {"device": [0, 0], "tenant": [0, 0]})

    await orm(publish_many, tenant, events(3, "seen", device="dev-pos") + events(2, "all"))
    await edge.forward()
    await peer.until_events(5)
    await wait_positions(connection_id, {"device": [3, 0], "tenant": [2, 0]})


def test_moved_positions__only_peers_whose_position_changed_are_written() -> None:
    from backplane.edge import EdgeRuntime

    class Peer:
        def __init__(self, cid: str, where: dict[str, tuple[int, int]]) -> None:
            self.connection_id, self.where = cid, where

        def positions(self, heads: Any) -> dict[str, tuple[int, int]]:
            return self.where

    runtime = EdgeRuntime.__new__(EdgeRuntime)
    runtime.last_heads, runtime.last_positions, runtime.lagging = {}, {}, {}
    runtime.lag = metrics.Histogram(metrics.LAG_BUCKETS_EVENTS)
    a, b = Peer("a", {"device": (3, 0)}), Peer("b", {"device": (1, 2)})
    assert runtime._moved_positions([a, b]) == {"a": {"device": [3, 0]}, "b": {"device": [1, 2]}}
    assert list(runtime.lagging) == [b]  # looked at again at every beat until it caught up
    assert runtime._moved_positions([a, b]) == {}  # nothing moved: nothing to write
    b.where = {"device": (3, 0)}
    assert runtime._moved_positions([a, b]) == {"b": {"device": [3, 0]}}
    assert runtime.lagging == {}
    # The lag histogram follows the positions: one observation per socket and stream, now.
    assert runtime.lag.counts[0] == 2 and sum(runtime.lag.counts) == 2 and runtime.lag.sum == 0


def test_heartbeat__looks_only_at_sockets_that_were_stirred_or_lag() -> None:
    """An idle socket costs the beat nothing: only the sockets a batch, a head check, an
    add or a lag stirred have their positions computed."""
    from backplane.edge import EdgeRuntime

    class Peer:
        def __init__(self, cid: str) -> None:
            self.connection_id, self.asked = cid, 0

        def positions(self, heads: Any) -> dict[str, tuple[int, int]]:
            self.asked += 1
            return {"device": (1, 0)}

    runtime = EdgeRuntime.__new__(EdgeRuntime)
    runtime.last_heads, runtime.last_positions, runtime.lagging, runtime.stirred = {}, {}, {}, {}
    runtime.lag = metrics.Histogram(metrics.LAG_BUCKETS_EVENTS)
    peers = [Peer(f"p{i}") for i in range(3)]
    runtime.consumers = {p.connection_id: p for p in peers}
    runtime.stirred = dict.fromkeys(peers)  # as add() leaves them
    runtime._moved_positions(runtime._stirred())
    assert [p.asked for p in peers] == [1, 1, 1]
    runtime._moved_positions(runtime._stirred())
    assert [p.asked for p in peers] == [1, 1, 1]  # idle: not looked at
    runtime.stirred[peers[1]] = None  # a batch of its stream arrived
    runtime._moved_positions(runtime._stirred())
    assert [p.asked for p in peers] == [1, 2, 1]


async def test_heartbeat__positions_of_many_stirred_sockets_over_turns_of_the_loop(monkeypatch: Any) -> None:
    """SOCKETS_PER_TURN sockets' positions per turn of the loop; a socket gone between two
    turns is neither written nor kept as lagging (docs/decisions/0040)."""
    import asyncio

    from backplane import edge
    from backplane.edge import EdgeRuntime

    class Peer:
        def __init__(self, cid: str) -> None:
            self.connection_id, self.asked = cid, 0

        def positions(self, heads: Any) -> dict[str, tuple[int, int]]:
            self.asked += 1
            return {"device": (1, 2)}  # lagging: kept for the next beat while here

    monkeypatch.setattr(edge, "SOCKETS_PER_TURN", 2)
    runtime = EdgeRuntime.__new__(EdgeRuntime)
    runtime.last_heads, runtime.last_positions, runtime.lagging = {}, {}, {}
    runtime.lag = metrics.Histogram(metrics.LAG_BUCKETS_EVENTS)
    peers = [Peer(f"p{i}") for i in range(5)]
    runtime.consumers = {p.connection_id: p for p in peers}
    runtime.stirred = dict.fromkeys(peers)
    walk = asyncio.ensure_future(runtime._stirred_positions())
    await asyncio.sleep(0)  # the walk's first turn
    assert [p.asked for p in peers] == [1, 1, 0, 0, 0]
    del runtime.consumers["p4"]  # closed between two turns
    moved = await walk
    assert sorted(moved) == ["p0", "p1", "p2", "p3"]
    assert [p.asked for p in peers] == [1, 1, 1, 1, 0] and peers[4] not in runtime.lagging
