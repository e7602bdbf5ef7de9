"""Unit tests of the edge runtime's group membership (its one subscription per stream),
with a channel layer double whose leaves can be held open: the races between a heartbeat
leaving idle groups and sockets subscribing again."""

from __future__ import annotations

import asyncio
from typing import Any

from backplane import streams
from backplane.conf import conf
from backplane.edge import EdgeRuntime

CHANNEL = "edge-delivery-channel"


class GatedLayer:
    """group_add at once; group_discard waits for ``gate`` (a slow UNSUBSCRIBE)."""

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, str]] = []

    async def group_add(self, group: str, channel: str) -> None:
        self.calls.append(("add", group))
        self.groups.setdefault(group, set()).add(channel)

    async def group_discard(self, group: str, channel: str) -> None:
        self.calls.append(("discard", group))
        await self.gate.wait()
        self.groups.get(group, set()).discard(channel)


class Socket:
    def __init__(self, **keys: str) -> None:
        self.keys = keys


def subscribed(layer: GatedLayer, key: str) -> bool:
    return CHANNEL in layer.groups.get(streams.group_name(conf.channel_prefix, key), set())


async def until_discarding(layer: GatedLayer) -> None:
    for _ in range(100):  # a few loop turns: the leave runs as its own task
        if layer.calls and layer.calls[-1][0] == "discard":
            return
        await asyncio.sleep(0)
    raise AssertionError(f"no group_discard started: {layer.calls}")


def runtime_with(layer: Any) -> EdgeRuntime:
    runtime = EdgeRuntime("unit-edge")
    runtime.layer = layer
    runtime.stream_channel = CHANNEL
    return runtime


async def test_leave_idle_groups__keeps_a_group_a_socket_subscribed_to_while_earlier_leaves_waited() -> None:
    layer = GatedLayer()
    runtime = runtime_with(layer)
    a, b = Socket(tenant="t:1", device="d:1:a"), Socket(tenant="t:1", device="d:1:b")
    await runtime.subscribe(a)
    await runtime.subscribe(b)
    runtime.unsubscribe(a)
    runtime.unsubscribe(b)
    leaving = asyncio.create_task(runtime.leave_idle_groups())
    await until_discarding(layer)  # the heartbeat is now waiting on the first leave ("t:1")
    assert layer.calls[-1] == ("discard", streams.group_name(conf.channel_prefix, "t:1"))
    # A socket of "d:1:b" arrives: the group is still joined, so it need not wait.
    c = Socket(device="d:1:b")
    await asyncio.wait_for(runtime.subscribe(c), 1)
    layer.gate.set()
    assert await asyncio.wait_for(leaving, 1) == 2  # "t:1" and "d:1:a"; not "d:1:b"
    assert subscribed(layer, "d:1:b")
    assert not subscribed(layer, "t:1") and not subscribed(layer, "d:1:a")
    assert set(runtime.joins) == {"d:1:b"}


async def test_subscribe__waits_for_a_leave_of_the_same_group_in_flight_then_joins_again() -> None:
    layer = GatedLayer()
    runtime = runtime_with(layer)
    a = Socket(tenant="t:1")
    await runtime.subscribe(a)
    runtime.unsubscribe(a)
    leaving = asyncio.create_task(runtime.leave_idle_groups())
    await until_discarding(layer)
    again = asyncio.create_task(runtime.subscribe(Socket(tenant="t:1")))
    await asyncio.sleep(0.05)
    assert not again.done()  # it must not return before the UNSUBSCRIBE is through
    layer.gate.set()
    await asyncio.wait_for(asyncio.gather(leaving, again), 1)
    assert [kind for kind, _ in layer.calls] == ["add", "discard", "add"]
    assert subscribed(layer, "t:1")


async def test_unsubscribe__is_idempotent_and_keeps_streams_other_sockets_share() -> None:
    runtime = runtime_with(GatedLayer())
    a, b = Socket(tenant="t:1", device="d:1:a"), Socket(tenant="t:1", device="d:1:b")
    await runtime.subscribe(a)
    await runtime.subscribe(b)
    runtime.unsubscribe(a)
    runtime.unsubscribe(a)
    assert set(runtime.members) == {"t:1", "d:1:b"}
    assert list(runtime.members["t:1"]) == [b]


async def test_subscribe__new_groups_of_one_loop_turn_are_joined_in_one_call(monkeypatch: Any) -> None:
    from backplane.vendor import channels as vendor_channels

    layer = GatedLayer()
    runtime = runtime_with(layer)
    batches: list[list[str]] = []
    real = vendor_channels.group_add_many

    async def recorded(layer: Any, groups: list[str], channel: str) -> None:
        batches.append(list(groups))
        await real(layer, groups, channel)

    monkeypatch.setattr(vendor_channels, "group_add_many", recorded)
    sockets = [Socket(tenant="t:1", device=f"d:1:{n}") for n in range(3)]
    await asyncio.wait_for(asyncio.gather(*(runtime.subscribe(s) for s in sockets)), 1)
    group = streams.group_name
    # The tenant's stream first (each socket joins its streams in turn), then the three new
    # device streams together, as a storm's sockets arrive with their tenant's stream joined.
    assert batches == [[group(conf.channel_prefix, "t:1")], [group(conf.channel_prefix, f"d:1:{n}") for n in range(3)]]
    assert all(subscribed(layer, k) for k in ("t:1", "d:1:0", "d:1:1", "d:1:2"))


async def test_subscribe__a_failed_batch_join_fails_its_sockets_and_the_next_one_tries_again() -> None:
    class FailOnce(GatedLayer):
        failed = False

        async def group_add(self, group: str, channel: str) -> None:
            if not self.failed:
                self.failed = True
                raise ConnectionError("redis away")
            await super().group_add(group, channel)

    layer = FailOnce()
    runtime = runtime_with(layer)
    first = await asyncio.gather(runtime.subscribe(Socket(device="d:1:a")), return_exceptions=True)
    assert isinstance(first[0], ConnectionError)
    assert runtime.joins == {}
    await asyncio.wait_for(runtime.subscribe(Socket(device="d:1:a")), 1)
    assert subscribed(layer, "d:1:a")
