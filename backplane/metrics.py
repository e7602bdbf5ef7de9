"""Prometheus metrics of one process: an edge, a relay, a compactor (``/metrics``).

The hot paths (an edge's fan-out, a relay's per-row work) count in plain ints and dicts
(``EdgeCounts``, the ``Relay``'s attributes): prometheus-client's own metrics take a lock per
``inc()``, and the fan-out runs ~100 000 times a second. ``Collector`` turns those numbers
into metric families when Prometheus scrapes; nothing is computed between scrapes.

Names follow prometheus-client's conventions: ``tyrum_backplane_`` prefix, ``_total`` for
counters, base units (``_seconds``, ``_bytes``). docs/operations.md lists them and what to
alert on; docs/grafana-backplane.json charts them.
"""

from __future__ import annotations

import bisect
import hmac
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as _Collector

PREFIX = "tyrum_backplane"
# The environment variable holding the bearer token a scrape must send (a secret, like the
# Redis keys: kept out of settings files); unset: /metrics is open, keep it off public networks.
METRICS_TOKEN_ENV = "METRICS_TOKEN"  # noqa: S105  (a variable name)
# Commit -> frame latency (seconds): loopback is milliseconds, a backlog seconds to minutes.
LATENCY_BUCKETS_SECS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Relay cycle duration (seconds).
CYCLE_BUCKETS_SECS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A peer's lag behind its stream's head (events).
LAG_BUCKETS_EVENTS = (0, 1, 10, 100, 1000, 10_000, 100_000)


class Histogram:
    """A histogram in plain ints: ``observe`` is one bisect and two adds, no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def forget(self, value: float) -> None:
        """Take back one ``observe(value)`` (a histogram of current values, kept up to date)."""
        self.counts[bisect.bisect_left(self.bounds, value)] -= 1
        self.sum -= value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class EdgeCounts:
    """What an edge process counts (one per process: its sockets share one runtime per loop)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.frames_sent = 0  # live frames, the fan-out's fast path and the slow path's
        self.replayed = 0  # frames sent by resumes
        self.gap_fills = 0
        self.gap_filled_events = 0
        self.resumes: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS_SECS)
        self.peer_lag = Histogram(LAG_BUCKETS_EVENTS)  # replaced at each head check


class CompactionCounts:
    """What compaction did in this process (``compact_outbox``, ``serve``'s loop)."""

    def __init__(self) -> None:
        self.rows_removed: Counter[str] = Counter()  # by rule
        self.partitions_dropped = 0
        self.runs = 0
        self.last_success = 0.0  # Unix time


edge = EdgeCounts()
compaction = CompactionCounts()
# Relays running in this process (``run_backplane``: one; ``serve``: one).
relays: list[Any] = []


class ActionCounter(logging.Handler):
    """Count the backplane's log records by ``action`` (a slow consumer's 4013, a failed
    heartbeat, a quarantined tenant): rare events, counted without touching their code."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[tuple[str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        action = getattr(record, "action", None)
        if action:
            self.counts[(str(action), record.levelname.lower())] += 1


actions = ActionCounter()


def install() -> None:
    """Count log records by action (idempotent; called as a process starts serving)."""
    root = logging.getLogger("backplane")
    if actions not in root.handlers:
        root.addHandler(actions)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


class Collector(_Collector):
    """Read the process's counters at scrape time."""

    def collect(self) -> Iterator[Metric]:
        yield from _log_metrics()
        runtimes = _runtimes()
        if runtimes:
            yield from edge_metrics(edge, runtimes)
        for relay in list(relays):
            yield from relay_metrics(relay)
        if compaction.runs:
            yield from compaction_metrics(compaction)


def _log_metrics() -> Iterator[Metric]:
    family = _counter("log_records", "Log records by action and level.", ["action", "level"])
    for (action, level), n in sorted(actions.counts.items()):
        family.add_metric([action, level], n)
    yield family


def _runtimes() -> list[Any]:
    module = sys.modules.get("backplane.edge")  # only an edge process has imported it
    return list(module.EdgeRuntime._by_loop.values()) if module is not None else []


def edge_metrics(counts: EdgeCounts, runtimes: Sequence[Any]) -> Iterator[Metric]:
    """An edge's metric families: ``counts`` and its runtimes' sockets."""
    from backplane.vendor import daphne as vendor_daphne

    roles: Counter[str] = Counter()
    buffered = 0
    draining = 0
    for runtime in runtimes:
        draining += bool(runtime.draining)
        for consumer in list(runtime.consumers.values()):
            roles[str(consumer.principal.role)] += 1
            proto = getattr(consumer, "proto", None)
            if proto is not None and getattr(proto, "transport", None) is not None:
                buffered += vendor_daphne.outbound_buffered(proto.transport)
    connections = _gauge("edge_connections", "Open sockets by role.", ["role"])
    for role, n in sorted(roles.items()):
        connections.add_metric([role], n)
    yield connections
    yield GaugeMetricFamily(f"{PREFIX}_edge_draining", "1 while this edge drains.", value=draining)
    yield CounterMetricFamily(
        f"{PREFIX}_edge_redis_messages_rejected",
        "Messages from Redis dropped unread (forged, another key, too old, another edge's).",
        value=sum(int(getattr(runtime, "rejected", 0)) for runtime in runtimes),
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_edge_outbound_buffer_bytes", "Bytes written to sockets, not yet sent.", value=buffered
    )
    handshakes = _counter("edge_handshakes", "WebSocket upgrades by outcome and reason.", ["outcome", "reason"])
    handshakes.add_metric(["accepted", ""], counts.accepted)
    for reason, n in sorted(counts.refused.items()):
        handshakes.add_metric(["refused", reason], n)
    yield handshakes
    yield CounterMetricFamily(f"{PREFIX}_edge_frames_sent", "Live event frames sent.", value=counts.frames_sent)
    yield CounterMetricFamily(f"{PREFIX}_edge_frames_replayed", "Event frames sent by resumes.", value=counts.replayed)
    yield CounterMetricFamily(f"{PREFIX}_edge_gap_fills", "Gaps filled from the outbox.", value=counts.gap_fills)
    yield CounterMetricFamily(
        f"{PREFIX}_edge_gap_filled_events", "Events sent by gap fills.", value=counts.gap_filled_events
    )
    resumes = _counter("edge_resumes", "Resumed streams by outcome.", ["outcome"])
    for outcome, n in sorted(counts.resumes.items()):
        resumes.add_metric([outcome], n)
    yield resumes
    closes = _counter("edge_closes", "Sockets closed by the edge, by close code.", ["code"])
    for code, n in sorted(counts.closes.items()):
        closes.add_metric([str(code)], n)
    yield closes
    yield CounterMetricFamily(
        f"{PREFIX}_edge_slow_consumer_closes",
        "Sockets closed 4013 (the peer read too slowly).",
        value=sum(n for (action, _), n in actions.counts.items() if action == "slow_consumer"),
    )
    yield counts.latency.family(
        f"{PREFIX}_edge_commit_to_frame_seconds", "From an event's occurred_at to its frame leaving this edge."
    )
    yield counts.peer_lag.family(
        f"{PREFIX}_edge_peer_lag_events", "Each socket's stream lag behind the stream's head, at the last head check."
    )


def relay_metrics(relay: Any) -> Iterator[Metric]:
    """A relay's metric families (``relay.Relay``'s counters; the backlog is read at its cycle)."""
    yield CounterMetricFamily(f"{PREFIX}_events_assigned", "Outbox rows given an offset.", value=relay.assigned_total)
    yield CounterMetricFamily(
        f"{PREFIX}_events_forwarded", "Outbox rows sent to Redis and marked.", value=relay.forwarded_total
    )
    yield relay.cycle_seconds.family(f"{PREFIX}_relay_cycle_seconds", "One relay cycle (assign, send, mark).")
    yield GaugeMetricFamily(f"{PREFIX}_relay_shards_held", "Shards this relay holds.", value=len(relay.leases.owned))
    wakes = _counter("relay_wakeups", "What woke the relay between cycles.", ["reason"])
    wakes.add_metric(["doorbell"], relay.wakes)
    wakes.add_metric(["poll"], relay.polls)
    yield wakes
    errors = _counter("relay_errors", "Relay failures by kind.", ["kind"])
    for kind, n in sorted(relay.errors.items()):
        errors.add_metric([kind], n)
    yield errors
    backlog = relay.backlog
    if backlog is not None:
        gauge = _gauge("outbox_backlog_rows", "Outbox rows waiting (capped count), by state.", ["state"])
        gauge.add_metric(["unassigned"], backlog["unassigned"])
        gauge.add_metric(["unforwarded"], backlog["unforwarded"])
        yield gauge
        yield GaugeMetricFamily(
            f"{PREFIX}_outbox_oldest_pending_age_seconds",
            "Age of the oldest row not forwarded yet.",
            value=backlog["oldest_pending_age_secs"],
        )


def compaction_metrics(counts: CompactionCounts) -> Iterator[Metric]:
    rows = _counter("compaction_rows_removed", "Outbox rows removed by compaction, by rule.", ["rule"])
    for rule, n in sorted(counts.rows_removed.items()):
        rows.add_metric([rule], n)
    yield rows
    yield CounterMetricFamily(
        f"{PREFIX}_compaction_partitions_dropped", "Outbox partitions dropped.", value=counts.partitions_dropped
    )
    yield CounterMetricFamily(f"{PREFIX}_compaction_runs", "Compactions run.", value=counts.runs)
    yield GaugeMetricFamily(
        f"{PREFIX}_compaction_last_success_timestamp_seconds",
        "Unix time of the last compaction that finished.",
        value=counts.last_success,
    )


def record_compaction(result: Any) -> None:
    """Count one finished compaction (``retention.CompactionResult``)."""
    if result.skipped or result.dry_run:
        return
    for rule, n in result.by_rule.items():
        compaction.rows_removed[rule] += n
    compaction.partitions_dropped += result.partitions_dropped
    compaction.runs += 1
    compaction.last_success = time.time()


def observe_latency(frame: str, now: float) -> None:
    """Observe commit -> frame latency from one event frame's ``occurred_at`` (once per batch)."""
    at = frame.find('"occurred_at":"')
    if at < 0:
        return
    start = at + 15
    end = frame.find('"', start)
    try:
        sent = datetime.fromisoformat(frame[start:end]).timestamp()
    except ValueError:
        return
    edge.latency.observe(max(0.0, now - sent))


def write_textfile(path: str) -> None:
    """Write this process's metrics to ``path`` atomically (a one-shot command's, for
    node_exporter's textfile collector)."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, registry)


registry = CollectorRegistry(auto_describe=False)
registry.register(Collector())


def exposition(authorization: str | None) -> tuple[int, str, bytes]:
    """The ``/metrics`` answer: (status, content type, body). With ``METRICS_TOKEN``
    set, only a request bearing it gets the metrics."""
    token = os.environ.get(METRICS_TOKEN_ENV, "")
    if token and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        return 401, "text/plain; charset=utf-8", b"unauthorized\n"
    return 200, CONTENT_TYPE_LATEST, generate_latest(registry)


class MetricsEndpoint:
    """ASGI: answer ``GET /metrics`` in the event loop (before Django, whatever the ``Host``:
    Prometheus scrapes by address); hand every other request to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/metrics" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        auth = next((v.decode("latin1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"), None)
        status, ctype, body = exposition(auth)
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})
