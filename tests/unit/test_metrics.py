"""Unit tests of ``backplane.metrics``: plain-int histograms, the exposition and its token,
the latency read from a frame, and each socket's lag behind its streams' heads."""

from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from backplane import metrics, protocol
from backplane.consumers import GatewayConsumer
from backplane.delivery import Delivery, TokenBucket
from backplane.edge import _lag_histogram


def test_histogram__buckets_are_cumulative_with_a_sum():
    h = metrics.Histogram((1, 10))
    for value in (0, 1, 5, 50):
        h.observe(value)
    family = h.family("x_events", "doc")
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("x_events_bucket", "1.0")] == 2
    assert got[("x_events_bucket", "10.0")] == 3
    assert got[("x_events_bucket", "+Inf")] == 4
    assert (got[("x_events_count", None)], got[("x_events_sum", None)]) == (4, 56)


def test_exposition__needs_the_bearer_token_when_one_is_set(monkeypatch):
    monkeypatch.setenv(metrics.METRICS_TOKEN_ENV, "s3cret")
    assert metrics.exposition(None)[0] == 401
    assert metrics.exposition("Bearer wrong")[0] == 401
    status, ctype, body = metrics.exposition("Bearer s3cret")
    assert status == 200 and ctype.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "tyrum_backplane_log_records" in names
    monkeypatch.delenv(metrics.METRICS_TOKEN_ENV)
    assert metrics.exposition(None)[0] == 200


def test_observe_latency__reads_occurred_at_from_the_frame():
    before = metrics.edge.latency.counts[:]
    sent = "2026-01-01T00:00:00.000000+00:00"
    frame = protocol.event_frame("tenant", "ep", 1, "id", "t", sent, "{}")
    metrics.observe_latency(frame, time.time())
    changed = [i for i, (a, b) in enumerate(zip(before, metrics.edge.latency.counts, strict=True)) if a != b]
    assert changed == [len(metrics.LATENCY_BUCKETS_SECS)]  # months old: past the last bound


class Head(SimpleNamespace):
    epoch: str
    offset: int
    first_retained: int


def socket_at(delivered: dict[str, int]) -> GatewayConsumer:
    consumer = GatewayConsumer.__new__(GatewayConsumer)
    consumer.closed = False
    consumer.keys = {name: f"key-{name}" for name in delivered}
    heads = {name: Head(epoch="e", offset=offset, first_retained=1) for name, offset in delivered.items()}
    consumer.delivery = Delivery(consumer.keys, heads, max_replay=10, max_frame_bytes=100,
                                 inbound=TokenBucket(1, 1, 0))
    return consumer


def test_positions__are_the_last_offset_delivered_and_the_lag_behind_the_head():
    consumer = socket_at({"tenant": 5, "device": 2})
    heads = {"key-tenant": Head(epoch="e", offset=9, first_retained=1),
             "key-device": Head(epoch="e", offset=2, first_retained=1)}
    assert consumer.positions(heads) == {"tenant": (5, 4), "device": (2, 0)}
    consumer.closed = True
    assert consumer.positions(heads) == {}


def test_lag_histogram__one_observation_per_socket_and_stream():
    heads = {"key-tenant": Head(epoch="e", offset=200, first_retained=1)}
    histogram = _lag_histogram([socket_at({"tenant": 200}), socket_at({"tenant": 150})], heads)
    assert histogram.counts[0] == 1  # lag 0
    assert histogram.counts[metrics.LAG_BUCKETS_EVENTS.index(100)] == 1  # lag 50: in (10, 100]
    assert sum(histogram.counts) == 2 and histogram.sum == 50


def exposed_names(monkeypatch) -> set[str]:
    """Every sample name of an edge, a relay and a compactor in one exposition."""
    from collections import Counter

    socket = SimpleNamespace(principal=SimpleNamespace(role="client"), proto=None)
    runtime = SimpleNamespace(draining=False, consumers={"c1": socket})
    relay = SimpleNamespace(assigned_total=1, forwarded_total=1, cycle_seconds=metrics.Histogram((1,)), wakes=0,
                            polls=0, errors=Counter({"send": 1}), leases=SimpleNamespace(owned={0}),
                            backlog={"unassigned": 0, "unforwarded": 0, "oldest_pending_age_secs": 0.0})
    monkeypatch.setattr(metrics, "_runtimes", lambda: [runtime])
    monkeypatch.setattr(metrics, "relays", [relay])
    monkeypatch.setattr(metrics.compaction, "runs", 1)
    monkeypatch.setattr(metrics.compaction, "rows_removed", Counter({"age": 1}))
    monkeypatch.setattr(metrics.edge, "closes", Counter({4001: 1}))
    monkeypatch.setattr(metrics.edge, "resumes", Counter({"recovered": 1}))
    monkeypatch.delenv(metrics.METRICS_TOKEN_ENV, raising=False)
    body = metrics.exposition(None)[2].decode()
    return {s.name for f in text_string_to_metric_families(body) for s in f.samples}


def test_docs__every_metric_the_dashboard_and_the_runbook_name_is_exposed(monkeypatch):
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    named = set()
    for doc in ("grafana-backplane.json", "operations.md"):
        named |= set(re.findall(r"tyrum_backplane_[a-z_]+", (docs / doc).read_text()))
    exposed = exposed_names(monkeypatch)
    assert len(named) > 10
    assert named <= exposed, sorted(named - exposed)
