"""``resume`` in process (docs/protocol.md): exact replay in offset order, then ``resumed``;
live events held behind the replay; every ``recovered: false`` reason; all or nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness.data import events, make_tenant, make_token, orm, publish, publish_many, stream_key
from harness.inprocess import InProcessEdge


async def test_resume__replays_exactly_the_missed_events_then_resumed(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    watcher = await edge.connect(await orm(make_token, tenant, "dev-1"))  # stays connected
    first = await edge.connect(token)
    for peer in (watcher, first):
        await peer.ping()
    await orm(publish_many, tenant, events(3, "seen", device="dev-1") + events(2, "seen"))
    await edge.forward()
    await first.until_events(5)
    saved = {name: {"epoch": first.stream_events(name)[-1]["epoch"], "offset": first.stream_events(name)[-1]["offset"]}
             for name in ("device", "tenant")}
    assert saved["device"]["offset"] == 3 and saved["tenant"]["offset"] == 2
    await first.close()

    await orm(publish_many, tenant, events(4, "missed", device="dev-1") + events(1, "missed")
              + events(2, "missed", role="client"))
    await edge.forward()
    await watcher.until_events(12)

    again = await edge.connect(token)
    assert {n: again.hello["streams"][n]["offset"] for n in ("device", "tenant", "role")} == \
        {"device": 7, "tenant": 3, "role": 2}
    await again.send({"type": "resume", "streams": saved})
    result = await again.until_resumed()
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
    assert again.frames.index(again.resumed_frame()) == len(again.frames) - 1  # replay first, then resumed

    await orm(publish, tenant, "after", {}, device="dev-1")
    await edge.forward()
    await again.until(lambda p: p.events[-1]["event"]["type"] == "after", what="the live event")
    assert again.events[-1]["offset"] == 8


async def test_resume__live_events_are_held_until_the_replay_is_done(edge: InProcessEdge, settings: Any) -> None:
    # A long hold: the test sends its resume after the live events reached the edge, however slow the machine.
    settings.BACKPLANE = {**settings.BACKPLANE, "LIVE_HOLD_MS": 10_000}
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(20, "old", device="dev-1"))
    await edge.forward()
    watcher = await edge.connect(token)
    await watcher.ping()

    peer = await edge.connect(token)
    epoch, head = peer.head("device")
    assert head == 20
    await orm(publish_many, tenant, events(5, "live", device="dev-1"))
    await edge.forward()
    # The edge hands a batch to every socket of its stream in one pass: once the watcher has
    # the live events, the new peer's are held at the edge.
    await watcher.until_events(5)
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 2}}})
    await peer.until_events(18 + 5)
    offsets = [e["offset"] for e in peer.stream_events("device")]
    assert offsets == list(range(3, 26))
    assert [e["event"]["type"] for e in peer.events] == ["old"] * 18 + ["live"] * 5
    position = peer.frames.index(peer.resumed_frame())
    assert [f["type"] for f in peer.frames[:position]] == ["hello"] + ["event"] * 18
    assert peer.resumed_frame()["streams"] == {"device": {"recovered": True, "replayed": 18}}

    await orm(publish, tenant, "later", {}, device="dev-1")
    await edge.forward()
    await peer.until_events(24)
    assert peer.events[-1]["offset"] == 26


async def test_resume__each_reason_and_exactly_the_named_streams(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(3, "x") + events(2, "x", role="client") + events(2, "x", device="dev-1"))
    await edge.forward()
    peer = await edge.connect(token)
    heads = peer.hello["streams"]
    assert {n: h["offset"] for n, h in heads.items()} == {"tenant": 3, "role": 2, "device": 2}
    other_epoch = "0" * 8 if heads["tenant"]["epoch"] != "0" * 8 else "1" * 8
    await peer.send({"type": "resume", "streams": {
        "tenant": {"epoch": other_epoch, "offset": 1},
        "role": {"epoch": heads["role"]["epoch"], "offset": 5},
        "bogus": {"epoch": heads["device"]["epoch"], "offset": 0},
        "device": {"epoch": heads["device"]["epoch"], "offset": 2},
    }})
    assert await peer.until_resumed() == {
        "tenant": {"recovered": False, "reason": "epoch_changed"},
        "role": {"recovered": False, "reason": "offset_ahead"},
        "bogus": {"recovered": False, "reason": "unknown_stream"},
        "device": {"recovered": True, "replayed": 0},
    }
    assert peer.events == []  # nothing replayed for a stream that is not recovered
    # Live delivery goes on from the head either way.
    await orm(publish_many, tenant, events(1, "y") + events(1, "y", role="client") + events(1, "y", device="dev-1"))
    await edge.forward()
    await peer.until_events(3)
    assert sorted((e["stream"], e["offset"]) for e in peer.events) == [("device", 3), ("role", 3), ("tenant", 4)]

    only_device = await edge.connect(token)
    await only_device.send({"type": "resume", "streams": {"device": {"epoch": heads["device"]["epoch"], "offset": 1}}})
    assert await only_device.until_resumed() == {"device": {"recovered": True, "replayed": 2}}
    nothing = await edge.connect(token)
    await nothing.send({"type": "resume", "streams": {}})
    assert await nothing.until_resumed() == {}


async def test_resume__past_compaction_is_retention_exceeded(edge: InProcessEdge) -> None:
    from backplane import retention
    from backplane.models import OutboxItem

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(5, "x", device="dev-1"))
    await edge.forward()
    await asyncio.sleep(1.1)  # older than the shortest retention window compaction takes
    await orm(retention.compact, 1.0)
    assert await orm(OutboxItem.objects.filter(tenant=tenant).count) == 0
    await orm(publish, tenant, "kept", {}, device="dev-1")
    await edge.forward()

    peer = await edge.connect(token)
    epoch, head = peer.head("device")
    assert head == 6
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 0}}})
    assert await peer.until_resumed() == {"device": {"recovered": False, "reason": "retention_exceeded"}}
    assert peer.events == []  # all or nothing: offset 6 is retained but is not replayed alone
    for offset, replayed in ((5, 1), (6, 0)):  # from the oldest retained offset on, replay is exact
        ok = await edge.connect(token)
        await ok.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": offset}}})
        assert await ok.until_resumed() == {"device": {"recovered": True, "replayed": replayed}}
        assert [e["offset"] for e in ok.events] == list(range(offset + 1, 7))


async def test_resume__first_retained_offset_bounds_replay(edge: InProcessEdge) -> None:
    from backplane.models import Stream

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(6, "x", device="dev-1"))
    await edge.forward()
    await orm(Stream.objects.filter(key=stream_key(tenant, "device")).update, first_retained_offset=4)
    peer = await edge.connect(token)
    epoch, _ = peer.head("device")
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 2}}})
    assert await peer.until_resumed() == {"device": {"recovered": False, "reason": "retention_exceeded"}}
    assert peer.events == []
    bounded = await edge.connect(token)
    await bounded.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 3}}})
    assert await bounded.until_resumed() == {"device": {"recovered": True, "replayed": 3}}
    assert [e["offset"] for e in bounded.events] == [4, 5, 6]


async def test_resume__a_hole_in_the_outbox_is_not_a_partial_recovery(edge: InProcessEdge) -> None:
    from backplane.models import OutboxItem

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    await orm(publish_many, tenant, events(4, "x", device="dev-1") + events(2, "x"))
    await edge.forward()
    await orm(OutboxItem.objects.filter(stream=stream_key(tenant, "device"), stream_offset=2).delete)
    peer = await edge.connect(token)
    heads = peer.hello["streams"]
    await peer.send({"type": "resume", "streams": {n: {"epoch": heads[n]["epoch"], "offset": 0}
                                                   for n in ("device", "tenant")}})
    assert await peer.until_resumed() == {"device": {"recovered": False, "reason": "retention_exceeded"},
                                          "tenant": {"recovered": True, "replayed": 2}}
    assert [(e["stream"], e["offset"]) for e in peer.events] == [("tenant", 1), ("tenant", 2)]


async def test_resume__after_the_hold_window_live_still_flows(edge: InProcessEdge) -> None:
    """A peer with nothing to resume sends nothing and gets live events from head + 1."""
    tenant = await orm(make_tenant)
    peer = await edge.connect(await orm(make_token, tenant, "dev-1"))
    await asyncio.sleep(0.4)  # past the 300 ms hold, without any frame
    await orm(publish_many, tenant, events(3, "x", device="dev-1"))
    await edge.forward()
    await peer.until_events(3)
    assert [e["offset"] for e in peer.events] == [1, 2, 3]


async def test_resume__a_replay_that_finds_the_socket_dropped_closes_it_4001(
    edge: InProcessEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay page is read only while daphne still has the socket (a storm's resumes can
    outlive their peers). Should the check answer "dropped" for a socket still open, the
    edge closes it 4001 — the peer reconnects and resumes — rather than leave it waiting for
    a ``resumed`` that never comes."""
    from backplane import consumers

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-g")
    await orm(publish_many, tenant, events(3, "old", device="dev-g"))
    await edge.forward()
    peer = await edge.connect(token)
    epoch, head = peer.head("device")
    assert head == 3
    monkeypatch.setattr(consumers.vendor_daphne, "gone", lambda proto: True)
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 0}}})
    assert await peer.closed() == 4001
    assert [f["type"] for f in peer.frames] == ["hello"]  # no replay, no resumed
