"""docs/protocol.md, "Frames" from the peer, in process: ping, unknown types, malformed and
binary frames (4400), the size limit (4009), the inbound rate (4029), and where ``resume``
may come."""

from __future__ import annotations

import json

import pytest

from harness.data import make_tenant, make_token, orm
from harness.inprocess import AsgiPeer, InProcessEdge


async def connected(edge: InProcessEdge) -> AsgiPeer:
    tenant = await orm(make_tenant)
    return await edge.connect(await orm(make_token, tenant, "dev-1"))


async def test_ping__is_answered_with_pong(edge: InProcessEdge) -> None:
    peer = await connected(edge)
    for _ in range(3):
        await peer.send({"type": "ping"})
        assert await peer.recv() == {"type": "pong"}


async def test_unknown_type__is_an_error_and_the_socket_stays_open(edge: InProcessEdge) -> None:
    peer = await connected(edge)
    for kind in ("subscribe", "hello", "event", "PING"):
        await peer.send({"type": kind, "x": 1})
        frame = await peer.recv()
        assert frame == {"type": "error", "code": "unknown_type"}, frame
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}


@pytest.mark.parametrize("frame", [
    "not json", "{\"type\": \"ping\"", "", "[]", "[{\"type\": \"ping\"}]", "\"ping\"", "42", "null", "{}",
    "{\"type\": 5}", "{\"type\": null}", "{\"type\": [\"ping\"]}", b"{\"type\": \"ping\"}",
], ids=lambda f: repr(f)[:24])
async def test_malformed_frame__closes_4400(edge: InProcessEdge, frame: str | bytes) -> None:
    peer = await connected(edge)
    await peer.send(frame)
    assert await peer.closed() == 4400


async def test_frame_size__over_64_kib_closes_4009(edge: InProcessEdge) -> None:
    peer = await connected(edge)
    limit = 64 * 1024
    body = json.dumps({"type": "ping", "pad": ""})
    at_limit = body.replace('""', '"' + "x" * (limit - len(body)) + '"')
    assert len(at_limit.encode()) == limit
    await peer.send(at_limit)
    assert await peer.recv() == {"type": "pong"}
    over = body.replace('""', '"' + "é" * ((limit - len(body)) // 2 + 1) + '"')  # over in bytes, not chars
    assert len(over) <= limit < len(over.encode())
    await peer.send(over)
    assert await peer.closed() == 4009


async def test_inbound_rate__a_flood_closes_4029(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    calm = await edge.connect(token)
    flood = await edge.connect(token)
    for _ in range(50):  # within the burst of 60: all answered
        await calm.send({"type": "ping"})
    await calm.until(lambda p: p.frames.count({"type": "pong"}) == 50, what="50 pongs")
    for _ in range(200):
        await flood.send({"type": "ping"})
    assert await flood.closed() == 4029
    pongs = flood.frames.count({"type": "pong"})
    assert 50 <= pongs < 200, pongs
    await calm.send({"type": "ping"})  # the other socket of the same token is not affected
    assert await calm.recv() == {"type": "pong"}


async def test_resume__not_first_frame_is_an_error(edge: InProcessEdge) -> None:
    peer = await connected(edge)
    epoch, offset = peer.head("device")
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": offset}}})
    assert await peer.recv() == {"type": "error", "code": "resume_not_first"}
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}


@pytest.mark.parametrize("streams", [
    None, [], "device", {"device": None}, {"device": {"epoch": 1, "offset": 0}}, {"device": {"offset": 0}},
    {"device": {"epoch": "e", "offset": -1}}, {"device": {"epoch": "e", "offset": 1.5}},
    {"device": {"epoch": "e", "offset": True}}, {"device": {"epoch": "e", "offset": "3"}},
], ids=lambda s: json.dumps(s)[:32])
async def test_resume__invalid_is_an_error_and_live_starts_from_the_head(edge: InProcessEdge, streams: object) -> None:
    from harness.data import publish

    tenant = await orm(make_tenant)
    peer = await edge.connect(await orm(make_token, tenant, "dev-1"))
    await peer.send({"type": "resume", "streams": streams})
    assert await peer.recv() == {"type": "error", "code": "invalid_resume"}
    await orm(publish, tenant, "after", {}, device="dev-1")
    await edge.forward()
    assert [(e["stream"], e["offset"]) for e in await peer.until_events(1)] == [("device", 1)]
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}
