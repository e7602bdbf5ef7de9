"""Delivery across edges: audiences, per-stream offsets, tenant isolation. (The event frame,
live after the hello head and publishes rolled back or repeated: tests/unit/protocol/.)

Producers publish from this process (``backplane.publish`` in a transaction; the relay is
woken by the Redis doorbell) or with ``manage.py publish_event``; peers sit on two edges.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from harness import procs
from harness.data import make_tenant, make_token, orm, publish, publish_many, wait_forwarded
from harness.peer import Peer

pytestmark = pytest.mark.e2e


def assert_contiguous(peer: Peer, name: str, first: int, last: int) -> None:
    offsets = [e["offset"] for e in peer.stream_events(name)]
    assert offsets == list(range(first, last + 1)), (name, offsets)


async def test_delivery__each_audience_reaches_exactly_its_peers_on_both_edges(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    spec = {  # peer -> (edge, device, role)
        "c1a": (0, "dev-1", "client"), "c1b": (1, "dev-1", "client"),  # one device, two edges
        "c2": (1, "dev-2", "client"), "n3": (0, "dev-3", "node"), "o4": (1, "dev-4", "operator"),
    }
    p: dict[str, Peer] = {}
    for name, (edge, device, role) in spec.items():
        p[name] = await peers(cluster.urls[edge], await orm(make_token, tenant, device, role))
    sent = {
        "tenant": await orm(publish_many, tenant, [{"type": "t.wide", "payload": {"i": i}} for i in range(3)]),
        "client": await orm(publish_many, tenant, [{"type": "r.client", "payload": {"i": i}, "role": "client"}
                                                   for i in range(2)]),
        "node": [await orm(publish, tenant, "r.node", {"i": 0}, role="node")],
        "dev-1": await orm(publish_many, tenant, [{"type": "d.one", "payload": {"i": i}, "device": "dev-1"}
                                                  for i in range(2)]),
        "dev-3": [await orm(publish, tenant, "d.three", {"i": 0}, device="dev-3")],
        "dev-9": [await orm(publish, tenant, "d.nobody", {"i": 0}, device="dev-9")],
    }
    cli = procs.manage("publish_event", "--tenant", tenant.slug, "--type", "d.cli", "--payload", '{"via": "cli"}',
                         "--device", "dev-2", env=cluster.env)
    sent["dev-2"] = [cli.strip().splitlines()[-1]]
    expected = {
        "c1a": {"tenant": sent["tenant"], "role": sent["client"], "device": sent["dev-1"]},
        "c1b": {"tenant": sent["tenant"], "role": sent["client"], "device": sent["dev-1"]},
        "c2": {"tenant": sent["tenant"], "role": sent["client"], "device": sent["dev-2"]},
        "n3": {"tenant": sent["tenant"], "role": sent["node"], "device": sent["dev-3"]},
        "o4": {"tenant": sent["tenant"], "role": [], "device": []},
    }
    for name, peer in p.items():
        want = sum(len(ids) for ids in expected[name].values())
        await peer.until_events(want, timeout=15)
    await asyncio.sleep(1.0)  # anything misrouted would have arrived by now (head checks run twice a second)
    for name, peer in p.items():
        await peer.quiet(0.05)
        for stream, ids in expected[name].items():
            got = peer.stream_events(stream)
            assert [e["event"]["event_id"] for e in got] == ids, (name, stream)
            assert_contiguous(peer, stream, 1, len(ids))
            assert {e["epoch"] for e in got} <= {peer.hello["streams"][stream]["epoch"]}
        assert {e["stream"] for e in peer.events} <= {"tenant", "role", "device"}
        raw = json.dumps(peer.frames)
        assert tenant.id.hex not in raw and str(tenant.id) not in raw, name  # relative names only
        others = {device for _, device, _ in spec.values()} - {spec[name][1]} | {"dev-9"}
        assert not [d for d in others if d in raw], name


async def test_delivery__offsets_are_contiguous_under_concurrent_producers(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    a, b = await peers(cluster.urls[0], token), await peers(cluster.urls[1], token)

    def produce(worker: int) -> None:
        for batch in range(10):
            publish_many(tenant, [{"type": "burst", "payload": {"w": worker, "b": batch, "i": i}}
                                  for i in range(10)]
                         + [{"type": "burst.dev", "payload": {"w": worker}, "device": "dev-1"}])

    await asyncio.gather(*(orm(produce, w) for w in range(3)))
    for peer in (a, b):
        await peer.until_events(330, timeout=30)
        assert_contiguous(peer, "tenant", 1, 300)
        assert_contiguous(peer, "device", 1, 30)
        assert len({e["event"]["event_id"] for e in peer.events}) == 330
    assert [e["event"]["event_id"] for e in a.events if e["stream"] == "tenant"] == \
        [e["event"]["event_id"] for e in b.events if e["stream"] == "tenant"]
    assert await a.quiet(0.6) == []


async def test_tenant_isolation__live_replay_and_resume_stay_in_the_tenant(cluster, peers) -> None:
    """Two tenants with the same device id and role: A's peer never sees B's events."""
    a, b = await orm(make_tenant), await orm(make_tenant)
    token_a, token_b = await orm(make_token, a, "dev-1"), await orm(make_token, b, "dev-1")
    peer_a = await peers(cluster.urls[0], token_a)
    peer_b = await peers(cluster.urls[1], token_b)
    ids_a: list[str] = []
    ids_b: list[str] = []
    for i in range(3):
        for tenant, ids in ((b, ids_b), (a, ids_a)):
            ids += await orm(publish_many, tenant, [
                {"type": "iso", "payload": {"i": i}},
                {"type": "iso", "payload": {"i": i}, "role": "client"},
                {"type": "iso", "payload": {"i": i}, "device": "dev-1"},
            ])
    await peer_a.until_events(9)
    await peer_b.until_events(9)
    assert sorted(e["event"]["event_id"] for e in peer_a.events) == sorted(ids_a)
    assert sorted(e["event"]["event_id"] for e in peer_b.events) == sorted(ids_b)
    # The same offsets and audiences, never the same stream: epochs differ per tenant.
    assert peer_a.hello["streams"] != peer_b.hello["streams"]

    # Replay: A resumes from 0 on the other edge, naming its own streams and B's positions.
    await wait_forwarded(b)
    replay = await Peer.open(cluster.urls[1], token_a)
    try:
        b_heads = peer_b.hello["streams"]
        await replay.send({"type": "resume", "streams": {
            **{n: {"epoch": s["epoch"], "offset": 0} for n, s in replay.hello["streams"].items()},
            f"t:{b.id.hex}": {"epoch": b_heads["tenant"]["epoch"], "offset": 0},
            f"d:{b.id.hex}:dev-1": {"epoch": b_heads["device"]["epoch"], "offset": 0},
        }})
        await replay.until(lambda p: any(f["type"] == "resumed" for f in p.frames), what="resumed")
        resumed = replay.frames[-1]["streams"]
        assert {k: v["recovered"] for k, v in resumed.items() if k in ("tenant", "role", "device")} == \
            {"tenant": True, "role": True, "device": True}
        assert [v.get("reason") for k, v in resumed.items() if k not in ("tenant", "role", "device")] == \
            ["unknown_stream", "unknown_stream"]
        assert sorted(e["event"]["event_id"] for e in replay.events) == sorted(ids_a)
        # Resume with B's epochs under A's own stream names: B's streams are not A's.
        again = await Peer.open(cluster.urls[0], token_a)
        try:
            await again.send({"type": "resume", "streams": {
                n: {"epoch": s["epoch"], "offset": 0} for n, s in b_heads.items()}})
            await again.until(lambda p: any(f["type"] == "resumed" for f in p.frames), what="resumed")
            assert {k: v.get("reason") for k, v in again.frames[-1]["streams"].items()} == \
                {"tenant": "epoch_changed", "role": "epoch_changed", "device": "epoch_changed"}
            assert again.events == []
        finally:
            await again.close()
    finally:
        await replay.close()
    seen_by_a = {e["event"]["event_id"] for e in peer_a.events + replay.events + again.events}
    assert seen_by_a == set(ids_a)
    told = [f for f in peer_a.frames + replay.frames + again.frames if f["type"] != "resumed"]  # it echoes names
    assert b.id.hex not in json.dumps(told)
