"""``resume`` on the wire: exact replay, live after replay, every ``recovered: false`` reason."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import support

from e2e.conftest import (
    Peer,
    make_tenant,
    make_token,
    orm,
    publish,
    publish_many,
    stream_key,
    wait_assigned,
    wait_forwarded,
)

pytestmark = pytest.mark.e2e


def resumed_frame(peer: Peer) -> dict[str, Any]:
    return next(f for f in peer.frames if f["type"] == "resumed")


async def until_resumed(peer: Peer) -> dict[str, Any]:
    await peer.until(lambda p: any(f["type"] == "resumed" for f in p.frames), what="resumed")
    return resumed_frame(peer)["streams"]


def events(n: int, kind: str, **audience: str) -> list[dict[str, Any]]:
    return [{"type": kind, "payload": {"i": i}, **audience} for i in range(n)]


async def test_resume__replays_exactly_the_missed_events_then_resumed(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    watcher = await peers(cluster.urls[1], await orm(make_token, tenant, "dev-1"))  # stays connected
    first = await peers(cluster.urls[0], token)
    await orm(publish_many, tenant, events(3, "seen", device="dev-1") + events(2, "seen"))
    await first.until_events(5)
    saved = {name: {"epoch": first.stream_events(name)[-1]["epoch"], "offset": first.stream_events(name)[-1]["offset"]}
             for name in ("device", "tenant")}
    assert saved["device"]["offset"] == 3 and saved["tenant"]["offset"] == 2
    await first.close()

    await orm(publish_many, tenant, events(4, "missed", device="dev-1") + events(1, "missed")
              + events(2, "missed", role="client"))
    await wait_assigned(stream_key(tenant, "device"), 7)
    await wait_assigned(stream_key(tenant, "tenant"), 3)
    await wait_assigned(stream_key(tenant, "role"), 2)
    await watcher.until_events(12)

    again = await peers(cluster.urls[1], token)  # the other edge
    assert {n: again.hello["streams"][n]["offset"] for n in ("device", "tenant", "role")} == \
        {"device": 7, "tenant": 3, "role": 2}
    await again.send({"type": "resume", "streams": saved})
    result = await until_resumed(again)
    assert result == {"device": {"recovered": True, "replayed": 4}, "tenant": {"recovered": True, "replayed": 1}}
    replayed = again.events
    assert [(e["stream"], e["offset"]) for e in replayed if e["stream"] == "device"] == \
        [("device", o) for o in range(4, 8)]
    assert [(e["stream"], e["offset"]) for e in replayed if e["stream"] == "tenant"] == [("tenant", 3)]
    assert not [e for e in replayed if e["stream"] == "role"]  # not named: not replayed
    # A replayed frame is the frame a connected peer got, byte for byte in meaning.
    live = {(e["stream"], e["offset"]): e for e in watcher.events}
    for frame in replayed:
        assert frame == live[(frame["stream"], frame["offset"])]
    assert again.frames.index(resumed_frame(again)) == len(again.frames) - 1  # replay first, then resumed

    await orm(publish, tenant, "after", {}, device="dev-1")
    await again.until(lambda p: p.events[-1]["event"]["type"] == "after", what="the live event")
    assert again.events[-1]["offset"] == 8


async def test_resume__live_events_are_held_until_the_replay_is_done(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(20, "old", device="dev-1"))
    await wait_assigned(stream_key(tenant, "device"), 20)
    await wait_forwarded(tenant)

    peer = await peers(cluster.urls[0], token)
    epoch, head = peer.head("device")
    assert head == 20
    # Publish live events right after hello and let them reach the edge before resuming: they
    # must wait behind the replay (PROTOCOL.md holds them until the first frame or 300 ms).
    live = asyncio.create_task(orm(publish_many, tenant, events(5, "live", device="dev-1")))
    await asyncio.sleep(0.1)  # the live events reach the edge meanwhile (a few ms from commit)
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 2}}})
    await live
    await peer.until_events(18 + 5)
    offsets = [e["offset"] for e in peer.stream_events("device")]
    assert offsets == list(range(3, 26))
    assert [e["event"]["type"] for e in peer.events] == ["old"] * 18 + ["live"] * 5
    position = peer.frames.index(resumed_frame(peer))
    assert [f["type"] for f in peer.frames[: position]] == ["hello"] + ["event"] * 18
    assert resumed_frame(peer)["streams"] == {"device": {"recovered": True, "replayed": 18}}

    await orm(publish, tenant, "later", {}, device="dev-1")
    await peer.until_events(24)
    assert peer.events[-1]["offset"] == 26


async def test_resume__each_reason_and_exactly_the_named_streams(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(3, "x") + events(2, "x", role="client")
              + events(2, "x", device="dev-1"))
    await wait_assigned(stream_key(tenant, "tenant"), 3)
    await wait_assigned(stream_key(tenant, "role"), 2)
    await wait_assigned(stream_key(tenant, "device"), 2)
    peer = await peers(cluster.urls[0], token)
    heads = peer.hello["streams"]
    other_epoch = "0" * 8 if heads["tenant"]["epoch"] != "0" * 8 else "1" * 8
    await peer.send({"type": "resume", "streams": {
        "tenant": {"epoch": other_epoch, "offset": 1},
        "role": {"epoch": heads["role"]["epoch"], "offset": 5},
        "bogus": {"epoch": heads["device"]["epoch"], "offset": 0},
        "device": {"epoch": heads["device"]["epoch"], "offset": 2},
    }})
    assert await until_resumed(peer) == {
        "tenant": {"recovered": False, "reason": "epoch_changed"},
        "role": {"recovered": False, "reason": "offset_ahead"},
        "bogus": {"recovered": False, "reason": "unknown_stream"},
        "device": {"recovered": True, "replayed": 0},
    }
    assert peer.events == []  # nothing replayed for a stream that is not recovered
    # Live delivery goes on from the head either way.
    await orm(publish_many, tenant, events(1, "y") + events(1, "y", role="client")
              + events(1, "y", device="dev-1"))
    await peer.until_events(3)
    assert sorted((e["stream"], e["offset"]) for e in peer.events) == [("device", 3), ("role", 3), ("tenant", 4)]

    only_device = await peers(cluster.urls[1], token)
    await only_device.send({"type": "resume", "streams": {"device": {"epoch": heads["device"]["epoch"], "offset": 1}}})
    assert await until_resumed(only_device) == {"device": {"recovered": True, "replayed": 2}}
    nothing = await peers(cluster.urls[1], token)
    await nothing.send({"type": "resume", "streams": {}})
    assert await until_resumed(nothing) == {}


async def test_resume__past_compaction_is_retention_exceeded(cluster, peers) -> None:
    from backplane.models import OutboxItem

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(5, "x", device="dev-1"))
    await wait_assigned(stream_key(tenant, "device"), 5)
    await wait_forwarded(tenant)
    await asyncio.sleep(1.1)  # older than the shortest retention window the command takes
    await asyncio.to_thread(support.manage, "compact_outbox", "--retention", "1s", env=cluster.env)
    assert await orm(OutboxItem.objects.filter(tenant=tenant).count) == 0
    await orm(publish, tenant, "kept", {}, device="dev-1")
    await wait_assigned(stream_key(tenant, "device"), 6)

    peer = await peers(cluster.urls[0], token)
    epoch, head = peer.head("device")
    assert head == 6
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 0}}})
    assert await until_resumed(peer) == {"device": {"recovered": False, "reason": "retention_exceeded"}}
    assert peer.events == []  # all or nothing: offset 6 is retained but is not replayed alone
    for offset, replayed in ((5, 1), (6, 0)):  # from the oldest retained offset on, replay is exact
        ok = await peers(cluster.urls[1], token)
        await ok.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": offset}}})
        assert await until_resumed(ok) == {"device": {"recovered": True, "replayed": replayed}}
        assert [e["offset"] for e in ok.events] == list(range(offset + 1, 7))


async def test_resume__first_retained_offset_bounds_replay(cluster, peers) -> None:
    from backplane.models import Stream

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(6, "x", device="dev-1"))
    await wait_assigned(stream_key(tenant, "device"), 6)
    await orm(Stream.objects.filter(key=stream_key(tenant, "device")).update, first_retained_offset=4)
    peer = await peers(cluster.urls[0], token)
    epoch, _ = peer.head("device")
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 2}}})
    assert await until_resumed(peer) == {"device": {"recovered": False, "reason": "retention_exceeded"}}
    assert peer.events == []
    edge = await peers(cluster.urls[1], token)
    await edge.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 3}}})
    assert await until_resumed(edge) == {"device": {"recovered": True, "replayed": 3}}
    assert [e["offset"] for e in edge.events] == [4, 5, 6]


async def test_resume__a_hole_in_the_outbox_is_not_a_partial_recovery(cluster, peers) -> None:
    from backplane.models import OutboxItem

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(4, "x", device="dev-1") + events(2, "x"))
    await wait_assigned(stream_key(tenant, "device"), 4)
    await wait_assigned(stream_key(tenant, "tenant"), 2)
    await wait_forwarded(tenant)
    await orm(OutboxItem.objects.filter(stream=stream_key(tenant, "device"), stream_offset=2).delete)
    peer = await peers(cluster.urls[1], token)
    heads = peer.hello["streams"]
    await peer.send({"type": "resume", "streams": {n: {"epoch": heads[n]["epoch"], "offset": 0}
                                                   for n in ("device", "tenant")}})
    assert await until_resumed(peer) == {"device": {"recovered": False, "reason": "retention_exceeded"},
                                         "tenant": {"recovered": True, "replayed": 2}}
    assert [(e["stream"], e["offset"]) for e in peer.events] == [("tenant", 1), ("tenant", 2)]


async def test_resume__after_the_hold_window_live_still_flows(cluster, peers) -> None:
    """A peer with nothing to resume sends nothing and gets live events from head + 1."""
    tenant = await orm(make_tenant)
    peer = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    await asyncio.sleep(0.4)  # past the 300 ms hold, without any frame
    await orm(publish_many, tenant, events(3, "x", device="dev-1"))
    await peer.until_events(3)
    assert [e["offset"] for e in peer.events] == [1, 2, 3]
