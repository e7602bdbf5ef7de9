"""The edge's head check reads only the heads that moved (docs/decisions/0027): a socket is
shown the heads when one of its streams' heads moved, when it is new, or when it asked to be
looked at again (a lag seen once); every HEAD_SWEEP_INTERVAL_SECS all of them. With a store
and sockets as doubles: what each check reads and which sockets it shows heads to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from backplane.conf import conf
from backplane.edge import EdgeRuntime
from backplane.store import Head

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def head(offset: int, epoch: str = "e") -> Head:
    return Head(epoch=epoch, offset=offset, first_retained=1)


class Store:
    def __init__(self) -> None:
        self.heads: dict[str, Head] = {}
        self.moved: dict[str, Head] = {}  # what the next heads_moved_since returns
        self.sinces: list[datetime | None] = []
        self.reads: list[list[str]] = []
        self.clock = T0

    def heads_moved_since(self, since: datetime | None) -> tuple[datetime, dict[str, Head]]:
        self.sinces.append(since)
        moved, self.moved = self.moved, {}
        self.clock += timedelta(seconds=0.5)
        return self.clock, moved if since is not None else {}

    def stream_heads(self, keys: list[str]) -> dict[str, Head]:
        self.reads.append(sorted(keys))
        return {k: self.heads[k] for k in keys if k in self.heads}


class Socket:
    def __init__(self, cid: str, key: str) -> None:
        self.connection_id = cid
        self.keys = {"device": key}
        self.seen: list[Any] = []
        self.again = False

    async def observe_heads(self, heads: dict[str, Any]) -> bool:
        self.seen.append(heads.get(self.keys["device"]))
        return self.again


def runtime_with(store: Store, *sockets: Socket) -> EdgeRuntime:
    runtime = EdgeRuntime("unit-edge", layer=object(), store=store)  # type: ignore[arg-type]
    for s in sockets:
        runtime.members.setdefault(s.keys["device"], {})[s] = None  # type: ignore[index]
        runtime.add(s)  # type: ignore[arg-type]
    return runtime


def observed(*sockets: Socket) -> list[int]:
    counts = [len(s.seen) for s in sockets]
    for s in sockets:
        s.seen.clear()
    return counts


async def test_head_check__idle_sockets_cost_nothing_between_sweeps() -> None:
    store = Store()
    store.heads = {"ka": head(1), "kb": head(1)}
    a, b = Socket("a", "ka"), Socket("b", "kb")
    runtime = runtime_with(store, a, b)

    await runtime.check_heads()  # the first check is a sweep: every head, every socket
    assert store.reads == [["ka", "kb"]] and observed(a, b) == [1, 1]
    assert store.sinces == [None]

    await runtime.check_heads()  # nothing moved: nothing read by key, no socket looked at
    assert store.reads == [["ka", "kb"]] and observed(a, b) == [0, 0]
    # Asked since the database's clock at the last check, less the margin.
    assert store.sinces[-1] == T0 + timedelta(seconds=0.5) - timedelta(seconds=conf.HEAD_CHECK_MARGIN_SECS)

    store.moved = {"ka": head(2), "other-edge-stream": head(9)}
    await runtime.check_heads()  # only the socket of the stream that moved
    assert observed(a, b) == [1, 0] and runtime.last_heads["ka"] == head(2)
    assert "other-edge-stream" not in runtime.last_heads

    store.moved = {"ka": head(2)}  # the margin repeats it: unchanged, nobody looks
    await runtime.check_heads()
    assert observed(a, b) == [0, 0]


async def test_head_check__a_socket_that_asks_is_looked_at_again_without_a_move() -> None:
    """The two-checks rule: a lag seen once must be seen again at the next check (then it is
    filled), though the head did not move again."""
    store = Store()
    store.heads = {"ka": head(1)}
    a = Socket("a", "ka")
    runtime = runtime_with(store, a)
    await runtime.check_heads()
    observed(a)

    a.again = True
    store.moved = {"ka": head(5)}
    await runtime.check_heads()
    await runtime.check_heads()
    assert a.seen == [head(5), head(5)]
    a.again = False
    await runtime.check_heads()  # looked at once more (it asked last time), then no more
    await runtime.check_heads()
    assert observed(a) == [3]


async def test_head_check__a_new_socket_is_shown_its_heads_once_and_the_sweep_shows_all() -> None:
    store = Store()
    store.heads = {"ka": head(1), "kc": head(7)}
    a = Socket("a", "ka")
    runtime = runtime_with(store, a)
    await runtime.check_heads()
    observed(a)

    c = Socket("c", "kc")
    runtime.members["kc"] = {c: None}  # type: ignore[dict-item]
    runtime.add(c)  # type: ignore[arg-type]
    await runtime.check_heads()
    assert store.reads[-1] == ["kc"]  # read by key: no socket of this edge had that stream
    assert c.seen == [head(7)] and runtime.last_heads["kc"] == head(7)
    assert observed(a, c) == [0, 1]

    runtime.next_sweep = 0.0  # due
    await runtime.check_heads()
    assert store.reads[-1] == ["ka", "kc"] and observed(a, c) == [1, 1]


async def test_head_check__a_stream_no_socket_needs_leaves_the_cache() -> None:
    """Its head is no longer kept up to date: a socket that needs it again reads it afresh."""
    store = Store()
    store.heads = {"ka": head(1)}
    a = Socket("a", "ka")
    runtime = runtime_with(store, a)
    await runtime.check_heads()
    runtime.remove(a)  # type: ignore[arg-type]
    runtime.unsubscribe(a)  # type: ignore[arg-type]
    assert "ka" not in runtime.last_heads

    store.heads["ka"] = head(4)  # moved while no socket of this edge had it
    b = Socket("b", "ka")
    runtime.members["ka"] = {b: None}  # type: ignore[dict-item]
    runtime.add(b)  # type: ignore[arg-type]
    await runtime.check_heads()
    assert b.seen == [head(4)]


async def test_head_check__a_sweep_hands_the_loop_back_between_batches_of_sockets(monkeypatch: Any) -> None:
    """A sweep shows the heads to SOCKETS_PER_TURN sockets per turn of the loop: what else is
    ready (a delivery) runs in between; a socket gone meanwhile is skipped (docs/decisions/0040)."""
    import asyncio

    from backplane import edge

    monkeypatch.setattr(edge, "SOCKETS_PER_TURN", 2)
    store = Store()
    sockets = [Socket(f"s{i}", f"k{i}") for i in range(5)]
    store.heads = {s.keys["device"]: head(1) for s in sockets}
    runtime = runtime_with(store, *sockets)
    seen_at_turn: list[list[int]] = []

    def other_work() -> None:  # a callback ready while the sweep runs, as a delivery would be
        seen_at_turn.append([len(s.seen) for s in sockets])
        runtime.consumers.pop("s4")  # closed in between

    loop = asyncio.get_running_loop()
    real_read = runtime._read_heads

    async def read_then_schedule(keys: Any) -> Any:
        heads = await real_read(keys)
        loop.call_soon(other_work)  # ready before the walk over the sockets begins
        return heads

    monkeypatch.setattr(runtime, "_read_heads", read_then_schedule)
    await runtime.check_heads()  # the first check is a sweep
    assert seen_at_turn == [[1, 1, 0, 0, 0]]
    assert [len(s.seen) for s in sockets] == [1, 1, 1, 1, 0]
