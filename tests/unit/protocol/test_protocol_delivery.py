"""Live delivery in process (docs/protocol.md, "Frames" and "Close codes"): a relay's batch
reaches the peer as event frames in offset order; a batch lost in transport is filled from
the outbox, repeats are dropped, an epoch change closes 4409, and directed commands close
the sockets they are about (4008, 4409)."""

from __future__ import annotations

import re
import uuid

from harness.data import events, make_tenant, make_token, orm, publish, publish_many, stream_key
from harness.inprocess import AsgiPeer, InProcessEdge


async def live_peer(edge: InProcessEdge, tenant: object, device: str = "dev-1") -> AsgiPeer:
    """A connected peer past the live hold (its first frame was a ping)."""
    peer = await edge.connect(await orm(make_token, tenant, device))
    await peer.ping()
    return peer


async def still_open(peer: AsgiPeer) -> None:
    await peer.send({"type": "ping"})
    await peer.until(lambda p: p.frames[-1:] == [{"type": "pong"}], what="pong")


async def test_delivery__a_relay_batch_arrives_live_as_event_frames_with_secrets_redacted(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    peer = await live_peer(edge, tenant)
    event_id = f"run-{uuid.uuid4().hex}"
    payload = {"run_id": "r1", "status": "running", "password": "hunter2",
               "nested": {"Api-Key": "k", "ok": [1, 2]}, "items": [{"Session_Token": "t", "n": 1}]}
    await orm(publish, tenant, "run.updated", payload, device="dev-1", event_id=event_id)
    assert await edge.forward() == 1
    frame = (await peer.until_events(1))[0]
    assert set(frame) == {"type", "stream", "epoch", "offset", "event"}
    assert (frame["type"], frame["stream"], frame["offset"]) == ("event", "device", 1)
    assert frame["epoch"] == peer.hello["streams"]["device"]["epoch"]
    event = frame["event"]
    assert set(event) == {"event_id", "type", "occurred_at", "payload"}
    assert (event["event_id"], event["type"]) == (event_id, "run.updated")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", event["occurred_at"]), event["occurred_at"]
    assert event["payload"] == {"run_id": "r1", "status": "running", "password": "[REDACTED]",
                                "nested": {"Api-Key": "[REDACTED]", "ok": [1, 2]},
                                "items": [{"Session_Token": "[REDACTED]", "n": 1}]}


async def test_delivery__each_stream_in_offset_order_to_exactly_its_audience(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    one, two = await live_peer(edge, tenant, "dev-1"), await live_peer(edge, tenant, "dev-2")
    batch = events(4, "t") + events(3, "d", device="dev-1") + events(2, "r", role="client")
    ids = await orm(publish_many, tenant, batch)
    await edge.forward()
    await one.until_events(9)
    await two.until_events(6)
    for peer in (one, two):
        for name in ("tenant", "role", "device"):
            offsets = [e["offset"] for e in peer.stream_events(name)]
            assert offsets == list(range(1, len(offsets) + 1)), (name, offsets)
    assert [e["event"]["event_id"] for e in one.stream_events("device")] == ids[4:7]
    assert two.stream_events("device") == []
    assert await one.quiet(0.1) == [] and await two.quiet(0.1) == []


async def test_delivery__live_starts_after_the_hello_head(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    await orm(publish_many, tenant, [{"type": "before", "payload": {}, "device": "dev-1"} for _ in range(2)])
    await edge.forward()
    peer = await live_peer(edge, tenant)
    assert peer.head("device")[1] == 2
    await orm(publish, tenant, "after", {}, device="dev-1")
    await edge.forward()
    events_seen = await peer.until_events(1)
    assert [(e["event"]["type"], e["offset"]) for e in events_seen] == [("after", 3)]
    assert await peer.quiet(0.2) == []


async def test_delivery__rolled_back_and_repeated_publishes_deliver_once(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    peer = await live_peer(edge, tenant)

    def rolled_back() -> None:
        from django.db import transaction

        from backplane import publish as bp_publish

        class Abort(Exception):
            pass

        try:
            with transaction.atomic():
                bp_publish(tenant, "ghost", {}, device="dev-1", event_id="ghost-1")
                raise Abort
        except Abort:
            pass

    await orm(rolled_back)
    await orm(publish, tenant, "once", {"n": 1}, device="dev-1", event_id="same-id")
    await orm(publish, tenant, "once", {"n": 2}, device="dev-1", event_id="same-id")  # idempotent: a no-op
    await orm(publish, tenant, "last", {}, device="dev-1")
    await edge.forward()
    await peer.until_events(2)
    assert await peer.quiet(0.2) == []
    assert [(e["event"]["type"], e["event"]["event_id"], e["offset"]) for e in peer.events][0] == ("once", "same-id", 1)
    assert [(e["event"]["type"], e["offset"]) for e in peer.events] == [("once", 1), ("last", 2)]
    assert peer.events[0]["event"]["payload"] == {"n": 1}


async def test_gap__a_lost_batch_is_filled_from_the_outbox_before_the_next(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    peer = await live_peer(edge, tenant)
    lost = await orm(publish_many, tenant, events(2, "lost", device="dev-1"))
    assert await edge.forward(lose=True) == 2  # forwarded as far as the relay knows; never arrived
    assert await peer.quiet(0.05) == []
    later = await orm(publish, tenant, "later", {}, device="dev-1")
    await edge.forward()
    await peer.until_events(3)
    assert [(e["offset"], e["event"]["event_id"]) for e in peer.events] == list(zip([1, 2, 3], [*lost, later]))
    assert await peer.quiet(0.2) == []


async def test_gap__a_lost_last_batch_is_filled_by_the_head_check(edge: InProcessEdge) -> None:
    """Nothing follows the lost batch: the edge's head check sees the lag twice and fills it."""
    tenant = await orm(make_tenant)
    peer = await live_peer(edge, tenant)
    await orm(publish_many, tenant, events(2, "lost", device="dev-1"))
    await edge.forward(lose=True)
    await peer.until_events(2, timeout=5)  # two head checks, 0.5 s apart
    assert [e["offset"] for e in peer.events] == [1, 2]


async def test_duplicates__a_batch_sent_again_is_dropped(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    peer = await live_peer(edge, tenant)
    await orm(publish_many, tenant, events(3, "x", device="dev-1") + events(2, "x"))
    await edge.forward()
    await peer.until_events(5)
    assert await edge.send_again() >= 2  # a relay that died before marking, then the next one
    await orm(publish, tenant, "next", {}, device="dev-1")
    await edge.forward()
    await peer.until_events(6)
    assert await peer.quiet(0.2) == []
    assert [e["offset"] for e in peer.stream_events("device")] == [1, 2, 3, 4]
    assert [e["offset"] for e in peer.stream_events("tenant")] == [1, 2]


async def test_stream_reset__epoch_change_closes_4409(edge: InProcessEdge) -> None:
    from backplane.models import Stream

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    peer = await edge.connect(token)
    await peer.ping()
    other = await live_peer(edge, tenant, "dev-2")
    await orm(Stream.objects.filter(key=stream_key(tenant, "device")).update, epoch="5e5e5e5e")
    assert await peer.closed(timeout=5) == 4409  # found by the edge's head check (twice a second)
    await still_open(other)  # dev-2's streams did not change
    again = await edge.connect(token)
    assert again.head("device")[0] == "5e5e5e5e"


async def test_edge_command__disconnect_closes_one_devices_sockets_with_4008(edge: InProcessEdge) -> None:
    from backplane import commands

    tenant = await orm(make_tenant)
    target = await live_peer(edge, tenant, "dev-1")
    neighbour = await live_peer(edge, tenant, "dev-2")
    assert await orm(commands.disconnect_device, tenant, "dev-1") == [edge.edge_id]
    await edge.forward()
    assert await target.closed() == 4008
    await still_open(neighbour)


async def test_edge_command__resync_closes_the_tenants_sockets_with_4409(edge: InProcessEdge) -> None:
    from backplane import commands

    tenant, bystander = await orm(make_tenant), await orm(make_tenant)
    here = await live_peer(edge, tenant, "dev-1")
    there = await live_peer(edge, tenant, "dev-2")
    calm = await live_peer(edge, bystander, "dev-1")
    assert await orm(commands.resync, tenant) == [edge.edge_id]
    await edge.forward()
    assert [await here.closed(), await there.closed()] == [4409, 4409]
    await still_open(calm)


async def test_revoke_token__closes_its_sockets_with_4008(edge: InProcessEdge) -> None:
    from backplane import tokens

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    revoked = await edge.connect(token)
    sibling = await live_peer(edge, tenant, "dev-1")  # same device, another token
    _, told = await orm(tokens.revoke_token, token)
    assert told == [edge.edge_id]
    await edge.forward()
    assert await revoked.closed() == 4008
    await still_open(sibling)
    assert await edge.refused_status(token) == 403
