"""Faults on a live cluster: relay and producer crashes, late commits, a lossy channel layer.

Each test starts the processes it needs, so a crashing relay is the only relay of its
shards; all of them are stopped by PID afterwards. (Tenant isolation across live delivery,
replay and resume is in test_delivery.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from harness import procs, waits
from harness.data import make_tenant, make_token, orm, publish, publish_many, wait_forwarded
from harness.peer import Peer

pytestmark = pytest.mark.e2e

# A producer in its own process: publish in a transaction; "inside" sleeps before COMMIT,
# "hold" commits once a file exists, "after" sleeps after COMMIT. It says where it is on stdout.
PRODUCER = """
import os, sys, time
import django
django.setup()
from django.db import transaction
from backplane import publish
tenant, event_id, mode = sys.argv[1:4]
with transaction.atomic():
    publish(tenant, "produced", {"mode": mode}, device="dev-1", event_id=event_id)
    print("inserted", flush=True)
    if mode == "inside":
        time.sleep(60)
    if mode == "hold":
        deadline = time.monotonic() + 30
        while not os.path.exists(sys.argv[4]) and time.monotonic() < deadline:
            time.sleep(0.02)
print("committed", flush=True)
time.sleep(60)
"""


def outbox_rows(tenant) -> list[tuple[str, int | None, bool]]:  # type: ignore[no-untyped-def]
    from backplane.models import OutboxItem

    rows = OutboxItem.objects.filter(tenant=tenant).order_by("id")
    return [(r.event_id, r.stream_offset, r.forwarded_at is not None) for r in rows]


async def wait_log(proc: procs.Proc, text: str, timeout: float = 20.0) -> None:
    await asyncio.to_thread(waits.wait_for, lambda: text in proc.log() or not proc.alive(), timeout, 0.02,
                            f"{proc.name} to print {text!r}")
    assert text in proc.log(), proc.log()[-2000:]


@pytest.mark.parametrize("failpoint", ["after_assign", "before_mark"])
async def test_relay__killed_mid_cycle_the_next_relay_resends_the_same_offsets(own_cluster, failpoint) -> None:
    own_cluster.start_edges([f"e2e-fault-{failpoint.replace('_', '-')}"])
    tenant = await orm(make_tenant)
    peer = await Peer.open(own_cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    try:
        crashing = own_cluster.start_relay("relay-crashing", BACKPLANE_FAILPOINT=failpoint)
        ids = await orm(publish_many, tenant, [{"type": "crash", "payload": {"i": i}, "device": "dev-1"}
                                               for i in range(3)])
        await asyncio.to_thread(crashing.popen.wait, 15)
        assert crashing.popen.returncode == -signal.SIGKILL, crashing.log()[-2000:]
        assert f"failpoint {failpoint}" in crashing.log()
        # Offsets are assigned (and committed); no relay recorded them as forwarded.
        assert await orm(outbox_rows, tenant) == [(ids[0], 1, False), (ids[1], 2, False), (ids[2], 3, False)]

        own_cluster.start_relay("relay-after")
        await wait_forwarded(tenant)
        await peer.until_events(3)
        assert await peer.quiet(1.2) == []  # each exactly once, whoever delivered it first
        assert [(e["offset"], e["event"]["event_id"]) for e in peer.events] == [(1, ids[0]), (2, ids[1]), (3, ids[2])]
        assert await orm(outbox_rows, tenant) == [(ids[0], 1, True), (ids[1], 2, True), (ids[2], 3, True)]
    finally:
        await peer.close()


async def test_producer__killed_right_after_commit_the_event_still_arrives(own_cluster) -> None:
    own_cluster.start_edges(["e2e-fault-producer"])
    own_cluster.start_relay("relay")
    tenant = await orm(make_tenant)
    peer = await Peer.open(own_cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    env = {"DJANGO_SETTINGS_MODULE": "tyrum.settings"}
    try:
        inside = own_cluster.spawn("producer-inside", [procs.PYTHON, "-c", PRODUCER, tenant.slug, "ev-lost",
                                                       "inside"], env=env)
        await wait_log(inside, "inserted")
        inside.kill()  # SIGKILL before COMMIT: nothing is published
        after = own_cluster.spawn("producer-after", [procs.PYTHON, "-c", PRODUCER, tenant.slug, "ev-kept",
                                                     "after"], env=env)
        await wait_log(after, "committed")
        after.kill()  # SIGKILL right after COMMIT: the event is durable
        events = await peer.until_events(1)
        assert [(e["offset"], e["event"]["event_id"]) for e in events] == [(1, "ev-kept")]
        assert await peer.quiet(1.2) == []
        assert await orm(outbox_rows, tenant) == [("ev-kept", 1, True)]
    finally:
        await peer.close()


async def test_relay__a_late_commit_with_a_lower_id_is_not_skipped(own_cluster, tmp_path) -> None:
    """The classic ``id > cursor`` bug: T1 inserts first, T2 commits first, then T1 commits."""
    own_cluster.start_edges(["e2e-fault-late"])
    own_cluster.start_relay("relay")
    tenant = await orm(make_tenant)
    peer = await Peer.open(own_cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    go = tmp_path / "commit-now"
    try:
        slow = own_cluster.spawn("producer-hold", [procs.PYTHON, "-c", PRODUCER, tenant.slug, "ev-first-in",
                                                   "hold", str(go)],
                                   env={"DJANGO_SETTINGS_MODULE": "tyrum.settings"})
        await wait_log(slow, "inserted")
        await orm(publish, tenant, "produced", {"mode": "fast"}, device="dev-1", event_id="ev-second-in")
        first = await peer.until_events(1)
        assert [(e["offset"], e["event"]["event_id"]) for e in first] == [(1, "ev-second-in")]
        go.touch()
        await wait_log(slow, "committed")
        await peer.until_events(2)
        assert [(e["offset"], e["event"]["event_id"]) for e in peer.events] == [(1, "ev-second-in"),
                                                                                 (2, "ev-first-in")]
        rows = await orm(outbox_rows, tenant)
        assert [r[0] for r in rows] == ["ev-first-in", "ev-second-in"]  # ids in insert order
    finally:
        await peer.close()


async def test_channel_layer__over_capacity_messages_are_filled_from_the_outbox(own_cluster) -> None:
    """The core layer drops group messages beyond its capacity; the edge must fill the gaps."""
    layer = {"BACKPLANE_LAYER": "core", "BACKPLANE_LAYER_CAPACITY": "2"}
    own_cluster.start_edges(["e2e-fault-capacity"], **layer)
    relay = own_cluster.start_relay("relay", "--batch-size", "1", **layer)
    edge = own_cluster.edges[0]
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    a, b = await Peer.open(own_cluster.urls[0], token), await Peer.open(own_cluster.urls[0], token)
    try:
        # Freeze the edge so the relay's 200 one-event messages pile up beyond capacity 2.
        os.kill(edge.pid, signal.SIGSTOP)
        try:
            ids = await orm(publish_many, tenant, [{"type": "burst", "payload": {"i": i}, "device": "dev-1"}
                                                   for i in range(200)])
            await wait_forwarded(tenant, timeout=60)
        finally:
            os.kill(edge.pid, signal.SIGCONT)
        ids += await orm(publish_many, tenant, [{"type": "live", "payload": {"i": i}, "device": "dev-1"}
                                                for i in range(20)])
        for peer in (a, b):
            await peer.until_events(220, timeout=30)
            assert await peer.quiet(1.2) == []
            assert [e["offset"] for e in peer.events] == list(range(1, 221))
            assert [e["event"]["event_id"] for e in peer.events] == ids
        assert "over capacity" in relay.log()  # the layer did drop messages
        assert "filled" in edge.log()  # and the edge filled them from the outbox
    finally:
        await a.close()
        await b.close()


async def test_relay__a_standby_takes_over_when_the_active_relay_dies(own_cluster) -> None:
    own_cluster.start_edges(["e2e-fault-standby"])
    active = own_cluster.start_relay("relay-active")
    standby = own_cluster.start_relay("relay-standby", wait=False)
    await wait_log(standby, "starting for")
    await asyncio.sleep(0.5)  # past its first attempt to take shards
    tenant = await orm(make_tenant)
    peer = await Peer.open(own_cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    try:
        ids = await orm(publish_many, tenant, [{"type": "before", "payload": {"i": i}} for i in range(30)])
        await peer.until_events(30)
        assert "took shards" not in standby.log()  # one active relay per shard
        active.kill()
        for i in range(30):  # while nobody holds the shards, then after the standby took them
            ids += await orm(publish_many, tenant, [{"type": "after", "payload": {"i": i}}])
        await peer.until_events(60, timeout=20)
        assert await peer.quiet(1.2) == []
        assert [e["offset"] for e in peer.events] == list(range(1, 61))
        assert [e["event"]["event_id"] for e in peer.events] == ids
        assert "took shards" in standby.log()
    finally:
        await peer.close()
    assert standby.stop() == 0  # SIGTERM: a clean stop that releases its leases
    assert "stopped after forwarding 30" in standby.log_path.read_text()


async def test_core_layer__heartbeat_rejoins_groups_after_a_redis_flush(own_cluster) -> None:
    """The core layer forgets group memberships on a flush (or a restart, or group_expiry);
    the edge's heartbeat adds its sockets back, so live delivery resumes without waiting for
    the head check (set to 30 s here, so only a re-join can deliver within the bound)."""
    import redis

    url = "redis://127.0.0.1:6379/9"
    env = {"BACKPLANE_LAYER": "core", "REDIS_URL": url, "BACKPLANE_HEARTBEAT_INTERVAL_SECS": "1",
           "BACKPLANE_CONNECTION_TTL_SECS": "10", "BACKPLANE_HEAD_CHECK_INTERVAL_SECS": "30"}
    own_cluster.start_edges(["e2e-fault-rejoin"], **env)
    own_cluster.start_relay("relay", **env)
    tenant = await orm(make_tenant)
    peer = await Peer.open(own_cluster.urls[0], await orm(make_token, tenant, "dev-1"))
    client = redis.Redis.from_url(url)
    try:
        await orm(publish, tenant, "before", {}, device="dev-1")
        await peer.until_events(1)
        client.flushdb()  # every group membership of the core layer is gone
        await asyncio.sleep(3.0)  # a few heartbeats
        await orm(publish, tenant, "after", {}, device="dev-1")
        events = await peer.until_events(2, timeout=5.0)
        assert [e["event"]["type"] for e in events] == ["before", "after"]
    finally:
        client.close()
        await peer.close()
