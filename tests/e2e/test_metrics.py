"""``/metrics`` of a live edge and relay (backplane/metrics.py), scraped after known traffic,
and the relay's probes on its HTTP port (``run_backplane --http-port``)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import waits
from harness.data import events as make_events
from harness.data import make_tenant, make_token, orm, publish_many, wait_forwarded
from harness.peer import Peer, refused_status

pytestmark = pytest.mark.e2e

HEARTBEAT_SECS = 1
SCRAPE_TIMEOUT_SECS = 10
SCRAPE_TOKEN = "scrape-secret-for-the-test"  # noqa: S105


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_SECS) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await asyncio.to_thread(get, url, token)
    assert status == 200, (status, body[:500])
    return samples(body)


async def test_metrics__edge_and_relay_count_the_traffic_sent(own_cluster) -> None:
    own_cluster.start_edges(["e2e-metrics-a"], BACKPLANE_HEARTBEAT_INTERVAL_SECS=str(HEARTBEAT_SECS))
    http = waits.free_port()
    relay = own_cluster.start_relay("e2e-metrics-relay", "--http-port", str(http), "--http-host", "127.0.0.1",
                                    METRICS_TOKEN=SCRAPE_TOKEN)
    (url,) = own_cluster.urls
    edge_metrics = url.replace("ws://", "http://").replace("/ws", "/metrics")
    relay_base = f"http://127.0.0.1:{http}"

    tenant = await orm(make_tenant)
    live = await Peer.open(url, await orm(make_token, tenant, "dev-1"))
    resumer = await Peer.open(url, await orm(make_token, tenant, "dev-2"))
    await resumer.send({"type": "resume", "streams": {n: {"epoch": s["epoch"], "offset": s["offset"]}
                                                      for n, s in resumer.hello["streams"].items()}})
    await resumer.until_resumed()
    assert await refused_status(url, token="tyr_" + "0" * 40) == 403
    sent = 7
    await orm(publish_many, tenant, make_events(sent, "metric.test"))
    await live.until_events(sent)
    await resumer.until_events(sent)
    await wait_forwarded(tenant)
    await live.send("not json")  # closed by the edge with 4400
    assert await live.closed() == 4400

    async def edge_settled() -> dict:
        got = await scrape(edge_metrics)
        heartbeat_done = got.get(("tyrum_backplane_edge_peer_lag_events_count", ()), 0) >= 1
        settled = got.get(("tyrum_backplane_edge_connections", (("role", "client"),))) == 1
        return got if heartbeat_done and settled else {}

    deadline = asyncio.get_running_loop().time() + 10 * HEARTBEAT_SECS
    edge = await edge_settled()
    while not edge and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        edge = await edge_settled()
    assert edge, "the edge's connections gauge did not settle at 1 client"
    assert edge[("tyrum_backplane_edge_handshakes_total", (("outcome", "accepted"), ("reason", "")))] == 2
    assert edge[("tyrum_backplane_edge_handshakes_total", (("outcome", "refused"), ("reason", "auth")))] == 1
    # Every event reached both peers once: live, or filled from the outbox by a head check.
    delivered = (edge[("tyrum_backplane_edge_frames_sent_total", ())]
                 + edge[("tyrum_backplane_edge_gap_filled_events_total", ())])
    assert delivered == 2 * sent
    assert edge[("tyrum_backplane_edge_frames_replayed_total", ())] == 0
    # Counted per stream resumed.
    assert edge[("tyrum_backplane_edge_resumes_total", (("outcome", "recovered"),))] == len(resumer.hello["streams"])
    assert edge[("tyrum_backplane_edge_closes_total", (("code", "4400"),))] == 1
    batches = edge[("tyrum_backplane_edge_commit_to_frame_seconds_count", ())]
    assert 1 <= batches <= sent
    assert 0 <= edge[("tyrum_backplane_edge_commit_to_frame_seconds_sum", ())] < 30 * batches
    assert edge[("tyrum_backplane_edge_draining", ())] == 0
    assert edge[("tyrum_backplane_log_records_total", (("action", "connected"), ("level", "info")))] == 2

    assert (await asyncio.to_thread(get, relay_base + "/metrics"))[0] == 401  # the token is required
    got = await scrape(relay_base + "/metrics", SCRAPE_TOKEN)
    assert got[("tyrum_backplane_events_forwarded_total", ())] >= sent
    # The module's database starts empty: this relay assigned exactly what was published (a
    # row may be sent twice, by a resend sweep, so forwarded is at least that).
    assert got[("tyrum_backplane_events_assigned_total", ())] == sent
    assert got[("tyrum_backplane_relay_shards_held", ())] == 16
    assert got[("tyrum_backplane_relay_cycle_seconds_count", ())] >= 1
    assert got[("tyrum_backplane_relay_wakeups_total", (("reason", "doorbell"),))] >= 1
    assert got[("tyrum_backplane_outbox_backlog_rows", (("state", "unassigned"),))] == 0
    assert got[("tyrum_backplane_outbox_oldest_pending_age_seconds", ())] == 0
    status, body = await asyncio.to_thread(get, relay_base + "/readyz")
    assert (status, json.loads(body)) == (200, {"ok": True, "shards": 16})
    assert (await asyncio.to_thread(get, relay_base + "/livez"))[0] == 200
    assert (await asyncio.to_thread(get, relay_base + "/nothing"))[0] == 404
    assert relay.alive()
    await resumer.close()
