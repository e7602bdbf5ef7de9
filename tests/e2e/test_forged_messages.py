"""Forged messages on Redis against real edges (issue 13, point 1).

Someone who reaches Redis publishes, raw on the channels the edges listen on, a ``bp.batch``
at the offset the next genuine event will take and a ``drain`` for an edge — in plaintext and
encrypted with a key of their own. The peer gets the genuine event at that offset and nothing
forged; the edge keeps accepting upgrades and its peers stay connected.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest
import redis.asyncio as aredis
from channels_redis.serializers import MsgPackSerializer
from django.conf import settings

from harness.data import make_tenant, make_token, orm, publish, stream_key
from harness.peer import Peer

pytestmark = pytest.mark.e2e

OTHER_KEY = "a-forgers-own-key-0123456789abcdefghijklmn"


def forgeries(message: dict[str, Any]) -> list[bytes]:
    """``message`` as someone without the cluster's key can send it."""
    return [msgpack.packb(message), MsgPackSerializer(symmetric_encryption_keys=[OTHER_KEY]).serialize(message)]


def raw_channel(group: str) -> str:
    return f"{settings.BACKPLANE_CHANNEL_PREFIX}:__group__{group}"


@pytest.fixture
async def raw_redis() -> Any:
    assert settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("symmetric_encryption_keys"), (
        "run with BACKPLANE_REDIS_KEYS set (make test sets it)"
    )
    client = aredis.Redis.from_url(settings.REDIS_URL)
    yield client
    await client.aclose()


async def test_edge__forged_batch_at_the_next_offset_never_reaches_the_peer(cluster, peers, raw_redis) -> None:
    from backplane import protocol, streams

    tenant = await orm(make_tenant)
    peer: Peer = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    first = await orm(publish, tenant, "run.updated", {"n": 1}, device="dev-1")
    await peer.until_events(1)
    event = peer.events[0]
    assert event["event"]["event_id"] == first
    key = stream_key(tenant, "device")
    frame = protocol.event_frame(
        event["stream"], event["epoch"], 2, "forged-event", "run.updated", event["event"]["occurred_at"], '{"n": -1}'
    )
    forged = {"type": "bp.batch", "stream": key, "epoch": event["epoch"], "items": [[2, frame]]}
    channel = raw_channel(streams.group_name(settings.BACKPLANE_CHANNEL_PREFIX, key))
    for data in forgeries(forged):
        assert await raw_redis.publish(channel, data) >= 1  # the edge of the peer hears it

    second = await orm(publish, tenant, "run.updated", {"n": 2}, device="dev-1")
    await peer.until_events(2)
    await peer.quiet(0.5)
    assert [(e["offset"], e["event"]["event_id"]) for e in peer.events] == [(1, first), (2, second)]


async def test_edge__forged_drain_leaves_the_edge_accepting_and_its_peers_connected(cluster, peers, raw_redis) -> None:
    from backplane import streams

    tenant = await orm(make_tenant)
    edge_id = cluster.edge_ids[0]
    peer: Peer = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    drain = {"type": "bp.command", "body": json.dumps({"command": "drain", "tenant_id": str(tenant.id)})}
    channel = raw_channel(streams.edge_group(settings.BACKPLANE_CHANNEL_PREFIX, edge_id))
    for data in forgeries(drain):
        assert await raw_redis.publish(channel, data) == 1  # the edge hears it

    assert [f for f in await peer.quiet(1.0) if f.get("type") != "event"] == []
    assert peer.ws.close_code is None
    late: Peer = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-2"))  # upgrades still accepted
    assert late.hello["type"] == "hello"
    sent = await orm(publish, tenant, "run.updated", {"n": 1})
    for p in (peer, late):
        await p.until_events(1)
        assert p.events[0]["event"]["event_id"] == sent
    await asyncio.sleep(0)
