"""Retention on a running cluster (issue 3): compaction while the relay and peers are busy,
and ``resume`` across compaction by row deletes and by partition drops.

The soak is issue 3's "done when" evidence: a producer publishes continuously, ``manage.py
compact_outbox`` runs every couple of seconds with a 5 s retention, connected peers (stock
``websockets`` client) collect every event; no peer may lose one, and the outbox's row
count must stay flat. It prints its samples (run with ``-s`` to see them).

Each test asks for ``services`` (``transactional_db``): besides a clean database, that makes
pytest-django create the test database when this module runs on its own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import UTC, timedelta
from typing import Any

import pytest

from harness import procs
from harness.data import make_tenant, make_token, orm, publish_many, stream_key, wait_assigned, wait_forwarded
from harness.peer import Peer, PeerClosed

pytestmark = pytest.mark.e2e

RETENTION_SECS = 5
SOAK_SECS = 24.0
RATE_PER_SEC = 40.0
COMPACT_PAUSE_SECS = 1.0  # between runs; a run itself (process start + compaction) takes ~1-2 s here
# Row-count bound: rate × (retention + the longest gap between compactions) × this slack.
SLACK = 1.5


def outbox_sample() -> dict[str, Any]:
    """Row count, rows past retention and on-disk size of the outbox (all partitions)."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE created_at < now() - make_interval(secs => %s)), "
            "count(*) FILTER (WHERE forwarded_at IS NULL) FROM backplane_outboxitem",
            [RETENTION_SECS],
        )
        rows, expired, unforwarded = cur.fetchone()
        cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
            "WHERE inhparent = 'backplane_outboxitem'::regclass"
        )
        size = cur.fetchone()[0]
    return {"rows": rows, "expired": expired, "unforwarded": unforwarded, "bytes": int(size)}


async def collect(peer: Peer, stop: asyncio.Event) -> None:
    """Read every frame until ``stop``; a close is recorded on the peer."""
    while not stop.is_set():
        try:
            await peer.recv(timeout=0.5)
        except TimeoutError:
            continue
        except PeerClosed as exc:
            peer.close_code = exc.code
            return


def produce(tenant: Any, devices: list[str], secs: float, rate: float) -> list[tuple[str, str]]:
    """Publish one event per tick, each in its own transaction; return (event_id, audience)."""
    from django.db import connections

    audiences: list[tuple[str, dict[str, str]]] = [("tenant", {}), ("role:client", {"role": "client"}),
                                                   ("role:node", {"role": "node"})]
    audiences += [(f"device:{d}", {"device": d}) for d in devices]
    sent: list[tuple[str, str]] = []
    started = time.monotonic()
    try:
        n = 0
        while (now := time.monotonic()) - started < secs:
            name, audience = audiences[n % len(audiences)]
            event_id = f"soak-{n}"
            publish_many(tenant, [{"type": "soak.tick", "payload": {"n": n}, "event_id": event_id, **audience}])
            sent.append((event_id, name))
            n += 1
            time.sleep(max(0.0, started + n / rate - now))
    finally:
        connections.close_all()
    return sent


def compact_repeatedly(env: dict[str, str], stop: threading.Event, samples: list[dict[str, Any]]) -> None:
    """Run ``manage.py compact_outbox`` until ``stop`` (and once more), sampling after each run."""
    from django.db import connections

    started = time.monotonic()
    try:
        while True:
            last = stop.is_set()
            t0 = time.monotonic()
            out = procs.manage("compact_outbox", env={**env, "BACKPLANE_RETENTION_SECS": str(RETENTION_SECS)},
                                 timeout=60)
            line = out.strip().splitlines()[-1]
            sample = {"t": round(time.monotonic() - started, 1), "run_secs": round(time.monotonic() - t0, 2),
                      "deleted": int(line.split()[1]) if line.startswith("deleted ") else 0, **outbox_sample()}
            samples.append(sample)
            if last:
                return
            stop.wait(COMPACT_PAUSE_SECS)
    finally:
        connections.close_all()


async def test_compaction__soak_under_load_loses_no_event_and_keeps_the_outbox_flat(cluster, peers, services) -> None:
    tenant = await orm(make_tenant)
    spec = [(0, "dev-0", "client"), (1, "dev-1", "client"), (0, "dev-2", "client"), (1, "dev-3", "node")]
    connected: list[tuple[Peer, set[str]]] = []
    for edge, device, role in spec:
        peer = await peers(cluster.urls[edge], await orm(make_token, tenant, device, role))
        assert all(s["offset"] == 0 for s in peer.hello["streams"].values())
        connected.append((peer, {"tenant", f"role:{role}", f"device:{device}"}))
    stop_peers = asyncio.Event()
    readers = [asyncio.create_task(collect(peer, stop_peers)) for peer, _ in connected]
    stop_compacting = threading.Event()
    samples: list[dict[str, Any]] = []
    compactor = asyncio.create_task(asyncio.to_thread(compact_repeatedly, cluster.env, stop_compacting, samples))

    t0 = time.monotonic()
    sent = await asyncio.to_thread(produce, tenant, [d for _, d, _ in spec] + ["dev-nobody"], SOAK_SECS, RATE_PER_SEC)
    produced_secs = time.monotonic() - t0
    await wait_forwarded(tenant, timeout=20)
    stop_compacting.set()
    await asyncio.wait_for(compactor, 90)

    def has_all(peer: Peer, wanted: set[str]) -> bool:
        return wanted <= {e["event"]["event_id"] for e in peer.events}

    expected = [{eid for eid, audience in sent if audience in streams} for _, streams in connected]
    deadline = time.monotonic() + 20
    while not all(has_all(p, want) for (p, _), want in zip(connected, expected, strict=True)):
        if time.monotonic() > deadline or any(p.close_code for p, _ in connected):
            break
        await asyncio.sleep(0.1)
    stop_peers.set()
    await asyncio.gather(*readers)

    rate = len(sent) / produced_secs
    gaps = [b["t"] - a["t"] for a, b in zip(samples, samples[1:], strict=False)]
    bound = rate * (RETENTION_SECS + max(gaps)) * SLACK
    report = {"events": len(sent), "secs": round(produced_secs, 1), "rate": round(rate, 1),
              "compactions": len(samples), "deleted": sum(s["deleted"] for s in samples), "bound": round(bound),
              "peers": []}
    for (peer, streams), want in zip(connected, expected, strict=True):
        got = {e["event"]["event_id"] for e in peer.events}
        report["peers"].append({"streams": sorted(streams), "expected": len(want), "received": len(peer.events),
                                "lost": len(want - got), "close": peer.close_code})
    print("\nsoak:", json.dumps({k: v for k, v in report.items() if k != "peers"}))
    for row in report["peers"]:
        print("  peer:", json.dumps(row))
    for s in samples:
        print("  sample:", json.dumps(s))

    for (peer, _), want in zip(connected, expected, strict=True):
        assert peer.close_code is None, f"a peer was closed with {peer.close_code}"
        got = [e["event"]["event_id"] for e in peer.events]
        assert want - set(got) == set(), f"lost {len(want - set(got))} of {len(want)}"
        assert len(got) == len(set(got)) == len(want), "a peer got an event twice or one not for it"
        for name in ("tenant", "role", "device"):
            offsets = [e["offset"] for e in peer.stream_events(name)]
            assert offsets == list(range(1, len(offsets) + 1)), (name, offsets[:20])
    assert len(sent) >= 0.8 * RATE_PER_SEC * SOAK_SECS  # the producer really ran at about the rate
    assert len(samples) >= 5 and report["deleted"] > 0.5 * len(sent)
    # Flat: after the first window, every sample stays under the bound, and the last third is
    # not above the middle third (no growth that compaction fails to keep up with).
    steady = [s for s in samples if s["t"] > 2 * RETENTION_SECS]
    assert steady and max(s["rows"] for s in steady) <= bound, (bound, [s["rows"] for s in samples])
    third = max(1, len(steady) // 3)
    assert max(s["rows"] for s in steady[-third:]) <= 1.25 * max(s["rows"] for s in steady[third:2 * third]) + 20
    assert all(s["unforwarded"] <= rate * 2 for s in samples)  # the relay kept up throughout


# --- resume across compaction --------------------------------------------------------------


def age_rows(tenant: Any, offsets: list[int], key: str, days: int = 2) -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "UPDATE backplane_outboxitem SET created_at = now() - make_interval(days => %s) "
            "WHERE tenant_id = %s AND stream = %s AND stream_offset = ANY(%s)",
            [days, tenant.id, key, offsets],
        )


async def resume(url: str, token: str, peers: Any, epoch: str, offset: int) -> tuple[dict[str, Any], list[int]]:
    peer = await peers(url, token)
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": offset}}})
    await peer.until(lambda p: any(f["type"] == "resumed" for f in p.frames), what="resumed")
    result = next(f for f in peer.frames if f["type"] == "resumed")["streams"]["device"]
    return result, [e["offset"] for e in peer.stream_events("device")]


async def test_resume__across_row_compaction_exact_inside_the_window_refused_outside(cluster, peers, services) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    key = stream_key(tenant, "device")
    await orm(publish_many, tenant, [{"type": "x", "payload": {"i": i}, "device": "dev-1"} for i in range(10)])
    await wait_assigned(key, 10)
    await wait_forwarded(tenant)
    first = await peers(cluster.urls[0], token)
    epoch, head = first.head("device")
    assert head == 10
    await orm(age_rows, tenant, [1, 2, 3, 4], key)

    out = await asyncio.to_thread(procs.manage, "compact_outbox", "--retention", "1h", env=cluster.env)
    assert out.strip().splitlines()[-1].startswith("deleted 4 rows")

    for offset in (0, 2, 3):  # before the first retained offset (5): refetch, nothing replayed
        result, replayed = await resume(cluster.urls[offset % 2], token, peers, epoch, offset)
        assert (result, replayed) == ({"recovered": False, "reason": "retention_exceeded"}, [])
    for offset in (4, 7, 10):  # inside the window: exact
        result, replayed = await resume(cluster.urls[offset % 2], token, peers, epoch, offset)
        assert result == {"recovered": True, "replayed": 10 - offset}
        assert replayed == list(range(offset + 1, 11))


async def test_resume__across_a_partition_drop(cluster, peers, services) -> None:
    from django.db import connection

    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    key = stream_key(tenant, "device")
    await orm(publish_many, tenant, [{"type": "x", "payload": {"i": i}, "device": "dev-1"} for i in range(6)])
    await wait_assigned(key, 6)
    await wait_forwarded(tenant)
    name = f"backplane_outboxitem_ptest_{uuid.uuid4().hex[:8]}"

    def make_old_partition() -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT date_trunc('hour', now()) - interval '72 hours'")
            lower = cur.fetchone()[0].astimezone(UTC)
            cur.execute(f'CREATE TABLE "{name}" PARTITION OF backplane_outboxitem FOR VALUES FROM (%s) TO (%s)',
                        [lower, lower + timedelta(hours=1)])
            cur.execute("UPDATE backplane_outboxitem SET created_at = %s WHERE stream = %s AND stream_offset <= 3",
                        [lower + timedelta(minutes=1), key])

    def drop_leftover() -> None:
        with connection.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{name}"')

    await orm(make_old_partition)
    try:
        out = await asyncio.to_thread(procs.manage, "compact_outbox", "--retention", "24h", env=cluster.env)
        assert "dropped 1 partitions" in out and out.strip().splitlines()[-1].startswith("deleted 3 rows")
        peer = await peers(cluster.urls[0], token)
        epoch, head = peer.head("device")
        assert head == 6
        assert await resume(cluster.urls[1], token, peers, epoch, 2) == (
            {"recovered": False, "reason": "retention_exceeded"}, [])
        assert await resume(cluster.urls[0], token, peers, epoch, 3) == ({"recovered": True, "replayed": 3}, [4, 5, 6])
    finally:
        await orm(drop_leftover)
