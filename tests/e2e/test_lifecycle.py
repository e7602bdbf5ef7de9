"""Closes while connected (PROTOCOL.md, "Close codes"), operators' edge commands, and the
connection directory.

4008 revocation, device disconnect and deactivation, 4401 expiry, 4409 resync, 4001 drain
and resume, 4013 slow consumer. 4009 and 4400 are shown in test_protocol.py; 4029, and 4409
on an epoch change, in process in tests/unit/protocol/.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness import procs
from harness.cluster import Cluster
from harness.data import (
    make_tenant,
    make_token,
    operator_session,
    orm,
    publish_many,
    stream_key,
    wait_assigned,
    wait_forwarded,
)
from harness.peer import OPERATOR_ORIGIN, PROTOCOL, Peer, refused_status

pytestmark = pytest.mark.e2e

# The edges here beat every second (BACKPLANE_HEARTBEAT_INTERVAL_SECS; the default is 5 s)
# so the checks that ride on the heartbeat are quick; waits on it are bounded at a few beats.
HEARTBEAT_SECS = 1
HEARTBEAT_BOUND_SECS = 5.0


@pytest.fixture(scope="module")
def module_cluster(module_env, tmp_path_factory):  # type: ignore[no-untyped-def]
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env=module_env)
    try:
        cluster.start_edges(["e2e-life-a", "e2e-life-b"], BACKPLANE_HEARTBEAT_INTERVAL_SECS=str(HEARTBEAT_SECS),
                            BACKPLANE_ALLOWED_ORIGINS=OPERATOR_ORIGIN)
        cluster.start_relay("e2e-life-relay")
        yield cluster
    finally:
        cluster.stop()


def token_id(token: str) -> str:
    """A token's id: revoke_token takes the id (or the token on stdin), never the token."""
    from backplane import auth
    from backplane.models import AccessToken

    return str(AccessToken.objects.get(token_hash=auth.hash_token(token)).id)


async def still_open(peer: Peer) -> None:
    await peer.send({"type": "ping"})
    await peer.until(lambda p: p.frames[-1:] == [{"type": "pong"}], what="pong")


async def edge_command(cluster: Cluster, *args: str) -> str:
    return await asyncio.to_thread(procs.manage, "edge_command", *args, env=cluster.env)


async def test_revoke_token__closes_its_sockets_on_every_edge_with_4008(cluster, peers) -> None:
    from backplane.models import OutboxItem

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    sibling = await orm(make_token, tenant, "dev-1")  # same device, another token
    a, b = await peers(cluster.urls[0], token), await peers(cluster.urls[1], token)
    other = await peers(cluster.urls[0], sibling)
    out = await asyncio.to_thread(procs.manage, "revoke_token", await orm(token_id, token), env=cluster.env)
    assert "told 2 edge(s)" in out, out
    codes = await asyncio.gather(a.closed(timeout=10), b.closed(timeout=10))
    assert codes == [4008, 4008]
    await still_open(other)
    assert await refused_status(cluster.urls[1], token=token) == 403
    # The heartbeat's token re-check may close the sockets before the commands arrive: wait
    # for the relay to have forwarded one command to each edge.
    forwarded = OutboxItem.objects.filter(tenant=tenant, kind="command", type="bp.disconnect",
                                          forwarded_at__isnull=False)
    wanted = sorted(f"e:{edge}" for edge in cluster.edge_ids)
    got: list[str] = []
    for _ in range(100):
        got = sorted(await orm(lambda: list(forwarded.values_list("stream", flat=True))))
        if got == wanted:
            break
        await asyncio.sleep(0.1)
    assert got == wanted


async def test_tenant_deactivated__closes_its_sockets_with_4008(cluster, peers) -> None:
    from backplane.models import Tenant

    tenant, bystander = await orm(make_tenant), await orm(make_tenant)
    peer = await peers(cluster.urls[1], await orm(make_token, tenant, "dev-1"))
    calm = await peers(cluster.urls[1], await orm(make_token, bystander, "dev-1"))
    await orm(Tenant.objects.filter(pk=tenant.pk).update, is_active=False)
    assert await peer.closed(timeout=HEARTBEAT_BOUND_SECS) == 4008
    await still_open(calm)


async def test_tenant_deactivated__closes_operator_session_sockets_with_4008(cluster, peers) -> None:
    from backplane.models import Tenant

    tenant = await orm(make_tenant)
    cookie = await orm(operator_session, tenant)
    operator = await peers(cluster.urls[0], headers={"Cookie": cookie, "Origin": OPERATOR_ORIGIN})
    await orm(Tenant.objects.filter(pk=tenant.pk).update, is_active=False)
    try:
        code = await operator.closed(timeout=HEARTBEAT_BOUND_SECS)
    except TimeoutError:
        code = None
    assert code == 4008
    assert await refused_status(cluster.urls[0], headers={"Cookie": cookie, "Origin": OPERATOR_ORIGIN}) == 403


async def test_token_expiry__closes_the_socket_with_4401(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    lifetime = 2.0
    token = await orm(make_token, tenant, "dev-1", expires_at=timezone.now() + timedelta(seconds=lifetime))
    connected = time.monotonic()
    peer = await peers(cluster.urls[0], token)
    assert await peer.closed(timeout=HEARTBEAT_BOUND_SECS) == 4401
    assert time.monotonic() - connected >= lifetime - 0.5
    assert await refused_status(cluster.urls[0], token=token) == 403


async def test_edge_command__resync_closes_the_tenants_sockets_with_4409(cluster, peers) -> None:
    tenant, bystander = await orm(make_tenant), await orm(make_tenant)
    here = await peers(cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    there = await peers(cluster.urls[1], await orm(make_token, tenant, "dev-2"))
    calm = await peers(cluster.urls[0], await orm(make_token, bystander, "dev-1"))
    out = await edge_command(cluster, "resync", "--tenant", tenant.slug)
    assert "told 2 edge(s)" in out, out
    assert await asyncio.gather(here.closed(timeout=10), there.closed(timeout=10)) == [4409, 4409]
    await still_open(calm)


async def test_edge_command__disconnect_closes_one_devices_sockets_with_4008(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    target = await peers(cluster.urls[1], token)
    neighbour = await peers(cluster.urls[1], await orm(make_token, tenant, "dev-2"))
    await edge_command(cluster, "disconnect", "--tenant", tenant.slug, "--device", "dev-1")
    assert await target.closed(timeout=10) == 4008
    await still_open(neighbour)


async def test_edge_command__resume_closes_4001_and_the_peer_resumes(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    peer = await peers(cluster.urls[0], token)
    await orm(publish_many, tenant, [{"type": "x", "payload": {}, "device": "dev-1"} for _ in range(2)])
    await peer.until_events(2)
    await edge_command(cluster, "resume", "--tenant", tenant.slug, "--device", "dev-1")
    assert await peer.closed(timeout=10) == 4001
    epoch, offset = peer.events[-1]["epoch"], peer.events[-1]["offset"]
    await orm(publish_many, tenant, [{"type": "y", "payload": {}, "device": "dev-1"} for _ in range(3)])
    await wait_assigned(stream_key(tenant, "device"), 5)
    again = await peers(cluster.urls[1], token)  # any edge
    await again.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": offset}}})
    await again.until(lambda p: p.frames[-1]["type"] == "resumed", what="resumed")
    assert [e["offset"] for e in again.events] == [3, 4, 5]
    assert again.frames[-1]["streams"] == {"device": {"recovered": True, "replayed": 3}}


async def test_edge__sigterm_drains_sockets_with_4001(own_cluster) -> None:
    from backplane.models import Connection, Edge

    own_cluster.start_edges(["e2e-life-sigterm"])
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    peers_here = [await Peer.open(own_cluster.urls[0], token) for _ in range(2)]
    try:
        edge = own_cluster.edges[0]
        edge.popen.send_signal(signal.SIGTERM)  # by PID; the fixture still stops it for sure
        codes = await asyncio.gather(*(p.closed(timeout=10) for p in peers_here))
    finally:
        for p in peers_here:
            await p.close()
    assert codes == [4001, 4001]
    assert await asyncio.to_thread(edge.popen.wait, 10) == 0
    assert not await orm(Edge.objects.filter(edge_id="e2e-life-sigterm").exists)
    assert not await orm(Connection.objects.filter(edge_id="e2e-life-sigterm").exists)


async def test_edge_command__drain_closes_4001_and_refuses_new_sockets_503(cluster, own_cluster) -> None:
    own_cluster.start_edges(["e2e-life-drained"])  # this module's relay carries the command
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    peer = await Peer.open(own_cluster.urls[0], token)
    try:
        out = await edge_command(cluster, "drain", "--edge", "e2e-life-drained")
        assert "told 1 edge(s)" in out, out
        assert await peer.closed(timeout=10) == 4001
    finally:
        await peer.close()
    assert await refused_status(own_cluster.urls[0], token=token) == 503
    elsewhere = await Peer.open(cluster.urls[0], token)  # the peer goes to another edge
    await elsewhere.close()


async def test_slow_consumer__is_cut_off_with_4013(cluster) -> None:
    """A peer that stops reading must not make the edge hold unbounded memory."""
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    ws = await connect(cluster.urls[0], subprotocols=[PROTOCOL],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"Bearer {token}"},
                       max_queue=1, max_size=2**24, open_timeout=10)
    try:
        blob = "x" * 48_000
        for start in range(0, 400, 50):  # 400 x 48 KB = 19 MB for a peer that reads nothing
            await orm(publish_many, tenant, [{"type": "big", "payload": {"i": i, "blob": blob}, "device": "dev-1"}
                                             for i in range(start, start + 50)])
        await wait_forwarded(tenant, timeout=60)
        await asyncio.sleep(2.0)
        received, code = 0, None
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                raw = await asyncio.wait_for(ws.recv(), 2.0)
                received += json.loads(raw)["type"] == "event"
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
        except TimeoutError:
            pass
    finally:
        ws.transport.abort()
    assert code == 4013, f"not cut off: got {received} of 400 events, close code {code}"
    assert received < 400


# --- the connection directory ---------------------------------------------------------------


async def test_edge__swept_directory_row_still_accepts_new_sockets(cluster, peers) -> None:
    """Another edge sweeps an edge's row after a heartbeat stall longer than the TTL; the
    edge lives on. Swept right before each connect, so a heartbeat that re-registers the
    row in between cannot hide the failure (it would have to do so five times)."""
    from backplane.models import Edge

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    for _ in range(5):
        await orm(Edge.objects.filter(edge_id=cluster.edge_ids[0]).delete)
        peer = await Peer.open(cluster.urls[0], token)
        await peer.close()


async def test_edge__swept_directory_rows_come_back_with_the_heartbeat(cluster, peers) -> None:
    from backplane import presence
    from backplane.models import Connection, Edge

    tenant = await orm(make_tenant)
    peer = await peers(cluster.urls[1], await orm(make_token, tenant, "dev-1"))
    assert await orm(Connection.objects.filter(connection_id=peer.hello["connection_id"]).exists)
    await orm(Edge.objects.filter(edge_id=cluster.edge_ids[1]).delete)  # cascades to its connections
    deadline = time.monotonic() + HEARTBEAT_BOUND_SECS
    while not await orm(presence, tenant) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    await still_open(peer)
    assert [d["device_id"] for d in await orm(presence, tenant)] == ["dev-1"]


def _subscribers(key: str) -> int:
    """Redis subscribers of a stream's group channel (the pub/sub layer's channel name)."""
    import redis
    from django.conf import settings

    from backplane import streams
    from backplane.conf import conf

    layer_prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
    channel = f"{layer_prefix}__group__{streams.group_name(conf.channel_prefix, key)}"
    client = redis.Redis.from_url(conf.redis_url)
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


async def test_edge_fan_out__one_subscription_per_stream_left_when_idle_and_joined_again(cluster, peers) -> None:
    """The sockets of one edge share its one subscription per stream: each gets every tenant
    event once and in order; when the last socket of a stream is gone the heartbeat leaves the
    group, and the next socket of that stream joins it again before its hello — so its events
    arrive live, not through the head check's gap fill."""
    tenant = await orm(make_tenant)
    tokens = [await orm(make_token, tenant, f"dev-{i}") for i in range(5)]
    group = [await peers(cluster.urls[0], t) for t in tokens]
    for peer in group:
        await still_open(peer)  # the first frame releases live delivery
    tenant_key, device_key = stream_key(tenant, "tenant"), stream_key(tenant, "device", device="dev-0")
    assert await asyncio.to_thread(_subscribers, tenant_key) == 1  # one edge, one subscription
    await orm(publish_many, tenant, [{"type": "fan", "payload": {"n": n}} for n in range(20)])
    for peer in group:
        await peer.until_events(20)
        assert [(e["stream"], e["offset"]) for e in peer.events] == [("tenant", n) for n in range(1, 21)]
    for peer in group:
        await peer.close()
    for _ in range(100):  # bounded: a few heartbeats
        if await asyncio.to_thread(_subscribers, device_key) == 0:
            break
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(_subscribers, device_key) == 0
    assert await asyncio.to_thread(_subscribers, tenant_key) == 0
    fills = cluster.logs()["e2e-life-a"].count("missed events from the outbox")
    again = await peers(cluster.urls[0], tokens[0])
    assert await asyncio.to_thread(_subscribers, device_key) == 1
    await still_open(again)
    await orm(publish_many, tenant, [{"type": "back", "payload": {}, "device": "dev-0"}])
    events = await again.until_events(1)
    assert [(e["stream"], e["offset"], e["event"]["type"]) for e in events] == [("device", 1, "back")]
    assert cluster.logs()["e2e-life-a"].count("missed events from the outbox") == fills
