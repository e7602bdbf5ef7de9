"""The failure matrix's checker: what every peer should have seen, and what it got.

Peers are ``backplane.client.TyrumClient`` instances (so the SDK's reconnect, resume and
dedupe are what is tested), each recorded at two levels:

- what the SDK yields (``PeerRecord.got``: event id, stream, epoch, offset, live or replayed,
  when), which is what an application sees;
- what arrived on the wire, per connection (``Session``: its ``hello`` heads, the positions
  it resumed from, the ``resumed`` answer, every event frame), which the SDK's dedupe would
  otherwise hide.

The truth is the outbox itself: every committed event of the scenario's tenants, with the
stream and offset the relay gave it. A peer should get every event of its three streams
(tenant, role, device) after the heads of its first ``hello``. ``Checker.verify`` compares
and counts; ``Checker.failures`` names what breaks the pass rule (zero lost per peer,
per-stream order held, zero cross-tenant deliveries, and the protocol's own promises).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backplane.client import Event, Resync, TyrumClient

# A delivery this much later than its commit counts as late, for recovery times: without
# faults the live path's p99 is under 0.1 s here; the edge's head check takes about a second.
LATE_SECS = 0.25


@dataclass(frozen=True)
class Row:
    """One committed event, as the outbox holds it after the scenario."""

    event_id: str
    tenant_id: str
    stream: str  # the stream key, e.g. "d:<tenant hex>:dev-1"
    offset: int | None  # None: committed but never assigned by a relay
    epoch: str
    forwarded: bool
    forwarded_at: float | None = None  # wall clock, seconds


@dataclass(frozen=True)
class Got:
    """One event as the SDK yielded it to the application."""

    event_id: str
    stream: str  # the stream's name on the wire: tenant, role or device
    epoch: str
    offset: int
    replayed: bool
    t: float
    connection_id: str | None
    payload_tenant: Any


@dataclass
class Session:
    """One connection of a peer, as seen on the wire."""

    connection_id: str
    edge_id: str
    t_hello: float
    heads: dict[str, tuple[str, int]]
    resume_from: dict[str, tuple[str, int]]  # the SDK's positions when the hello arrived
    resumed: dict[str, Any] | None = None
    frames: list[tuple[str, str, int, str]] = field(default_factory=list)  # stream, epoch, offset, event id


@dataclass
class PeerRecord:
    name: str
    tenant: str  # slug
    tenant_id: str
    device: str
    role: str
    keys: dict[str, str]  # stream name -> stream key
    home: int = 0  # index of the edge its front prefers
    sessions: list[Session] = field(default_factory=list)
    got: list[Got] = field(default_factory=list)
    resyncs: list[str] = field(default_factory=list)
    duplicates: int = 0
    reconnects: int = 0
    error: str | None = None

    @property
    def baseline(self) -> dict[str, tuple[str, int]]:
        """Heads of the first hello: the peer is owed every later offset."""
        return self.sessions[0].heads if self.sessions else {}


class RecordingClient(TyrumClient):
    """The SDK, with every server frame recorded per connection before the SDK handles it."""

    def __init__(self, url: str, token: str, record: PeerRecord, **kw: Any) -> None:
        super().__init__(url, token, **kw)
        self.record = record
        self.frames_seen = 0

    def _handle_frame(self, frame: dict[str, Any]) -> list[Event | Resync]:
        self.frames_seen += 1
        kind = frame.get("type")
        now = time.time()
        if kind == "hello":
            heads = {name: (s["epoch"], int(s["offset"])) for name, s in frame.get("streams", {}).items()}
            self.record.sessions.append(Session(str(frame.get("connection_id")), str(frame.get("edge_id")), now,
                                                heads, dict(self.streams)))
        elif kind == "event" and self.record.sessions:
            body = frame.get("event") or {}
            self.record.sessions[-1].frames.append(
                (str(frame.get("stream")), str(frame.get("epoch")), int(frame.get("offset", -1)),
                 str(body.get("event_id"))))
        elif kind == "resumed" and self.record.sessions:
            self.record.sessions[-1].resumed = dict(frame.get("streams") or {})
        return super()._handle_frame(frame)


class LivePeer:
    """A recording SDK client consuming ``events()`` in a task."""

    def __init__(self, record: PeerRecord, url: str, token: str) -> None:
        self.record = record
        self.client = RecordingClient(url, token, record, open_timeout=5.0)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._consume(), name=f"peer-{self.record.name}")

    async def _consume(self) -> None:
        try:
            async for item in self.client.events():
                if isinstance(item, Resync):
                    self.record.resyncs.append(f"{item.stream}:{item.reason}")
                    continue
                payload = item.payload if isinstance(item.payload, dict) else {}
                self.record.got.append(Got(item.event_id, item.stream, item.epoch, item.offset, item.replayed,
                                           time.time(), self.client.connection_id, payload.get("tenant")))
        except Exception as exc:  # a ClientError ends the peer: recorded, and a failure
            self.record.error = f"{type(exc).__name__}: {exc}"

    def sync_counters(self) -> None:
        self.record.duplicates = self.client.duplicates
        self.record.reconnects = self.client.reconnects

    async def stop(self) -> None:
        self.sync_counters()
        await self.client.close()
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 5)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task
        self.sync_counters()


def load_truth(dsn: str, tenant_ids: Iterable[str]) -> dict[str, Row]:
    """Read every committed event of ``tenant_ids`` from the outbox at ``dsn``."""
    import psycopg

    from backplane.models import OutboxItem, Stream

    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            f"SELECT o.event_id, o.tenant_id::text, o.stream, o.stream_offset, coalesce(s.epoch, ''), "
            f"o.forwarded_at IS NOT NULL, extract(epoch FROM o.forwarded_at)::float8 "
            f"FROM {OutboxItem._meta.db_table} o "
            f"LEFT JOIN {Stream._meta.db_table} s ON s.key = o.stream "
            f"WHERE o.kind = 'event' AND o.tenant_id = ANY(%s::uuid[])",
            [list(tenant_ids)],
        ).fetchall()
    return {r[0]: Row(*r) for r in rows}


def load_journal(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read the producers' journals (one JSON object per committed event)."""
    entries = []
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    with contextlib.suppress(ValueError):
                        entries.append(json.loads(line))
    return entries


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Checker:
    """Expected vs. got for one scenario; see the module docstring."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.peers: list[PeerRecord] = []
        self.truth: dict[str, Row] = {}
        self.journal: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}  # scenario-specific: take-over time, commit latency…
        self.edges = 0
        self.relays = 0
        self.report: dict[str, Any] = {}

    def fault(self, what: str, start: float, end: float | None = None) -> None:
        """Record a fault injected over [start, end] (wall clock)."""
        self.faults.append({"what": what, "start": start, "end": end if end is not None else start})

    def expected(self, peer: PeerRecord) -> dict[str, Row]:
        """The events ``peer`` is owed: its streams' events after its first hello's heads."""
        owed: dict[str, Row] = {}
        base = peer.baseline
        by_key = {key: name for name, key in peer.keys.items()}
        for row in self.truth.values():
            name = by_key.get(row.stream)
            if name is None or name not in base:
                continue
            epoch, head = base[name]
            if row.offset is None or row.epoch != epoch or row.offset > head:
                owed[row.event_id] = row
        return owed

    def pending(self) -> int:
        """Deliveries still owed (for waiting until the peers caught up)."""
        missing = 0
        for peer in self.peers:
            got = {g.event_id for g in peer.got}
            missing += sum(1 for eid in self.expected(peer) if eid not in got)
        return missing

    def verify(self) -> dict[str, Any]:
        commit_t = {e["id"]: float(e["t"]) for e in self.journal}
        # Latency figures are of the steady stream: a burst's or a held event's are their own.
        steady = {e["id"] for e in self.journal if not e.get("burst") and not e.get("held")}
        per_peer = []
        totals = dict.fromkeys(
            ("expected", "got", "lost", "cross_tenant", "misrouted", "offset_mismatch", "order_violations",
             "wire_violations", "wire_repeats", "resume_mismatch", "replay_excess", "resyncs", "replayed",
             "duplicates", "reconnects", "errors"), 0)
        latencies: list[float] = []
        for peer in self.peers:
            owed = self.expected(peer)
            got_ids = {g.event_id for g in peer.got}
            lost = sorted(eid for eid in owed if eid not in got_ids)
            cross = misrouted = mismatch = order = 0
            mine: list[float] = []
            last: dict[str, tuple[str, int]] = {}
            for g in peer.got:
                row = self.truth.get(g.event_id)
                if row is None or row.tenant_id != peer.tenant_id or g.payload_tenant != peer.tenant:
                    cross += 1
                    continue
                if row.stream != peer.keys.get(g.stream):
                    misrouted += 1
                if row.offset != g.offset or row.epoch != g.epoch:
                    mismatch += 1
                prev = last.get(g.stream)
                if prev is not None and prev[0] == g.epoch and g.offset <= prev[1]:
                    order += 1
                last[g.stream] = (g.epoch, g.offset)
                if g.event_id in steady:
                    mine.append(g.t - commit_t[g.event_id])
            latencies += mine
            wire, repeats, resume_bad, excess = self._wire(peer)
            entry = {
                "peer": peer.name, "tenant": peer.tenant, "device": peer.device, "role": peer.role,
                "expected": len(owed), "got": len(peer.got), "lost": len(lost), "lost_ids": lost[:10],
                "cross_tenant": cross, "misrouted": misrouted, "offset_mismatch": mismatch,
                "order_violations": order, "wire_violations": wire, "wire_repeats": repeats,
                "resume_mismatch": resume_bad, "replay_excess": excess, "resyncs": len(peer.resyncs),
                "replayed": sum(1 for g in peer.got if g.replayed), "duplicates": peer.duplicates,
                "reconnects": peer.reconnects, "errors": int(peer.error is not None),
                "edges": sorted({s.edge_id for s in peer.sessions}), "error": peer.error,
                "latency_p50_s": _r(_pct(mine, 0.5)), "latency_max_s": _r(max(mine, default=None)),
            }
            per_peer.append(entry)
            for key in totals:
                totals[key] += entry[key]
        recovery = [self._recovery(f, commit_t) for f in self.faults]
        relay_lag = [r.forwarded_at - commit_t[r.event_id] for r in self.truth.values()
                     if r.forwarded_at is not None and r.event_id in steady]
        self.report = {
            "scenario": self.scenario,
            "events": len(self.truth),
            "unassigned": sum(1 for r in self.truth.values() if r.offset is None),
            "unforwarded": sum(1 for r in self.truth.values() if not r.forwarded),
            "peers": len(self.peers),
            "tenants": len({p.tenant for p in self.peers}),
            "edges": self.edges,
            "relays": self.relays,
            "faults": [{**f, "recovery_s": rec} for f, rec in zip(self.faults, recovery, strict=True)],
            **totals,
            "lost_max_per_peer": max((p["lost"] for p in per_peer), default=0),
            "latency_p50_s": _r(_pct(latencies, 0.5)),
            "latency_p99_s": _r(_pct(latencies, 0.99)),
            "latency_max_s": _r(max(latencies, default=None)),
            "relay_lag_p99_s": _r(_pct(relay_lag, 0.99)),
            "relay_lag_max_s": _r(max(relay_lag, default=None)),
            "recovery_s": None if None in recovery else _r(max(recovery, default=None)),
            **self.figures,
            "per_peer": per_peer,
        }
        return self.report

    def _wire(self, peer: PeerRecord) -> tuple[int, int, int, int]:
        """Check each connection's frames against PROTOCOL.md: per stream, offsets increase by
        exactly one (no gap, no repeat); a resume starts where the SDK was and replays exactly
        (offset, head at hello]."""
        violations = repeats = resume_bad = excess = 0
        yielded_before: dict[str, list[tuple[float, str, int]]] = {}
        for g in peer.got:
            yielded_before.setdefault(g.stream, []).append((g.t, g.epoch, g.offset))
        for index, session in enumerate(peer.sessions):
            prev: dict[str, int] = {}
            seen: set[tuple[str, int]] = set()
            for stream, _epoch, offset, _eid in session.frames:
                if (stream, offset) in seen:
                    repeats += 1
                seen.add((stream, offset))
                if stream in prev and offset != prev[stream] + 1:
                    violations += 1
                prev[stream] = offset
            if index == 0:
                continue
            for name, (epoch, offset) in session.resume_from.items():
                # The SDK resumes from the last offset it yielded (or its first hello's head).
                earlier = [o for t, e, o in yielded_before.get(name, []) if t < session.t_hello and e == epoch]
                base = peer.baseline.get(name)
                should = max(earlier) if earlier else (base[1] if base and base[0] == epoch else None)
                if should is not None and offset != should:
                    resume_bad += 1
                result = (session.resumed or {}).get(name)
                head = session.heads.get(name)
                if result and result.get("recovered") and head and head[0] == epoch:
                    missed = head[1] - offset
                    sent = sum(1 for s, _e, o, _i in session.frames if s == name and offset < o <= head[1])
                    if result.get("replayed") != missed or sent != missed:
                        excess += abs(sent - missed) or 1
        return violations, repeats, resume_bad, excess

    def _recovery(self, fault: dict[str, Any], commit_t: dict[str, float]) -> float | None:
        """Seconds from the fault's end until the last delivery it delayed: the last receipt of
        an event committed since the fault began that reached a peer more than ``LATE_SECS``
        after its commit (0 if none was late; None if some owed event never came)."""
        last_late = fault["end"]
        for peer in self.peers:
            first: dict[str, float] = {}
            for g in peer.got:
                first.setdefault(g.event_id, g.t)
            for eid in self.expected(peer):
                if eid not in first:
                    return None
                t = commit_t.get(eid)
                if t is not None and t >= fault["start"] - LATE_SECS and first[eid] - t > LATE_SECS:
                    last_late = max(last_late, first[eid])
        return round(last_late - fault["end"], 3)

    def failures(self) -> list[str]:
        """What breaks the pass rule, one line each (empty: passed)."""
        r = self.report or self.verify()
        out = []
        for key in ("lost", "cross_tenant", "misrouted", "offset_mismatch", "order_violations", "wire_violations",
                    "wire_repeats", "resume_mismatch", "replay_excess", "resyncs", "errors", "unassigned"):
            if r.get(key):
                bad = [f"{p['peer']}={p[key]}" for p in r["per_peer"] if p.get(key)]
                out.append(f"{key}: {r[key]} ({', '.join(bad[:6])})")
        for p in r["per_peer"]:
            if p["expected"] == 0:
                out.append(f"peer {p['peer']} was owed nothing: the scenario tested nothing for it")
            if p["lost"]:
                out.append(f"peer {p['peer']} lost {p['lost']}, e.g. {p['lost_ids'][:3]}")
        return out

    def summary(self) -> str:
        """One line with the figures of this scenario."""
        r = self.report or self.verify()
        parts = [
            f"faults {self.scenario}:",
            f"events={r['events']}",
            f"peers={r['peers']}",
            f"deliveries={r['expected']}",
            f"lost={r['lost']}",
            f"duplicates={r['duplicates']}",
            f"cross_tenant={r['cross_tenant']}",
            f"order={r['order_violations'] + r['wire_violations']}",
            f"replayed={r['replayed']}",
            f"reconnects={r['reconnects']}",
            f"recovery={_fmt(r['recovery_s'])}",
            f"p99={_fmt(r['latency_p99_s'])}",
            f"max_latency={_fmt(r['latency_max_s'])}",
        ]
        parts += [f"{k}={_fmt(v)}" for k, v in self.figures.items() if isinstance(v, int | float | None)]
        return " ".join(parts)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}s"
    return str(value)
