"""One failure-matrix scenario: a cluster of two daphne edges and two relays, peers on both
edges through a TCP front each, a steady producer, and the checker.

Every process is a ``harness.procs.Proc`` stopped by its PID (``Scenario.close``); every wait is
bounded. Child processes get the test database (or a private PostgreSQL), Redis (or a private
one) and a channel prefix of their own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from faults.checker import Checker, LivePeer, PeerRecord, load_journal, load_truth
from faults.services import EdgeFront
from harness import procs, waits
from harness.cluster import Cluster

AGENT = str(Path(__file__).with_name("agent.py"))
# Events a second from the steady producer (one per transaction, tenants in turn).
RATE_PER_SEC = 40
# Peers: (tenant index, device, role, home edge index). The same device twice (on both
# edges), every role, and device ids that exist in both tenants (isolation is tested).
PEERS: list[tuple[int, str, str, int]] = [
    (0, "dev-1", "client", 0),
    (0, "dev-1", "client", 1),
    (0, "dev-2", "client", 1),
    (0, "node-1", "node", 0),
    (0, "node-2", "node", 0),
    (0, "op-1", "operator", 1),
    (1, "dev-1", "client", 0),
    (1, "dev-2", "client", 1),
    (1, "node-1", "node", 1),
    (1, "op-1", "operator", 0),
]
# Devices the producer addresses besides the peers' (nobody is connected as these).
OFFLINE_DEVICES = ["dev-offline"]
# Bounds (seconds).
CONNECT_TIMEOUT_SECS = 20.0
DRAIN_TIMEOUT_SECS = 40.0


class Scenario:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path, work_dir: Path) -> None:
        self.name = name
        self.tag = uuid.uuid4().hex[:6]
        self.env = {**env, "BACKPLANE_CHANNEL_PREFIX": f"{env['BACKPLANE_CHANNEL_PREFIX']}-{name}-{self.tag}"}
        self.log_dir = log_dir
        self.work_dir = work_dir
        self.cluster = Cluster(log_dir=log_dir, env=self.env)
        self.checker = Checker(name)
        self.fronts: list[EdgeFront] = []
        self.live: list[LivePeer] = []
        self.journals: list[Path] = []
        self.producers: list[procs.Proc] = []
        self.tenants: dict[str, str] = {}  # slug -> id
        self.slugs: list[str] = []
        self.closed = False

    @property
    def dsn(self) -> str:
        return self.env["DATABASE_URL"]

    # --- processes --------------------------------------------------------------------

    def start_cluster(self, *relay_args: str, edge_env: dict[str, str] | None = None,
                      relay_env: dict[str, str] | None = None) -> None:
        """Two edges; the active relay (waits until it holds every shard), then the standby
        (wants every shard too, holds none)."""
        edge_env, relay_env = edge_env or {}, relay_env or {}
        self.cluster.start_edges([f"{self.name}-{self.tag}-e0", f"{self.name}-{self.tag}-e1"], **edge_env)
        self.cluster.start_relay("relay-active", *relay_args, **relay_env)
        standby = self.cluster.start_relay("relay-standby", *relay_args, wait=False, **relay_env)
        waits.wait_for(lambda: "starting for" in standby.log() or not standby.alive(), timeout=30,
                         what="the standby relay to start")
        assert standby.alive(), standby.log()[-2000:]
        self.checker.edges, self.checker.relays = 2, 2

    @property
    def active_relay(self) -> procs.Proc:
        return self.cluster.relays[0]

    @property
    def standby_relay(self) -> procs.Proc:
        return self.cluster.relays[1]

    def agent(self, name: str, command: str, spec: dict[str, Any], journal: Path | None = None) -> procs.Proc:
        args = [procs.PYTHON, AGENT, command, json.dumps(spec)] + ([str(journal)] if journal else [])
        return self.cluster.spawn(name, args)

    def check_alive(self) -> None:
        """Every edge and relay is alive, except those the test killed (SIGKILL)."""
        for proc in [*self.cluster.edges, *self.cluster.relays]:
            assert proc.alive() or proc.popen.returncode == -9, f"{proc.name} died: {proc.log()[-3000:]}"

    # --- peers and producers ------------------------------------------------------------

    async def connect_peers(self, peers: list[tuple[int, str, str, int]] = PEERS) -> None:
        """Create two tenants and a token per peer, then connect every peer through the front
        of its home edge and wait for every hello (bounded)."""
        self.slugs = [f"{self.name[:16]}-{self.tag}-{c}" for c in "ab"]
        spec = {"tenants": self.slugs, "peers": [[self.slugs[t], d, r] for t, d, r, _ in peers]}
        setup = self.agent("setup", "setup", spec)
        await asyncio.to_thread(setup.popen.wait, 60)
        out = setup.log().strip().splitlines()
        assert setup.popen.returncode == 0 and out, setup.log()[-2000:]
        made = json.loads(out[-1])
        self.tenants = made["tenants"]
        from backplane import streams

        for home in range(len(self.cluster.ports)):
            front = EdgeFront([self.cluster.ports[(home + i) % len(self.cluster.ports)]
                               for i in range(len(self.cluster.ports))])
            await front.start()
            self.fronts.append(front)
        for index, ((t, device, role, home), token) in enumerate(zip(peers, made["tokens"], strict=True)):
            slug = self.slugs[t]
            tenant_id = self.tenants[slug]
            record = PeerRecord(f"p{index}-{'ab'[t]}-{device}-{role}-e{home}", slug, tenant_id, device, role,
                                streams.connection_streams(uuid.UUID(tenant_id), role, device), home)
            self.checker.peers.append(record)
            peer = LivePeer(record, self.fronts[home].url, token)
            peer.start()
            self.live.append(peer)
        deadline = time.monotonic() + CONNECT_TIMEOUT_SECS
        while not all(p.record.sessions for p in self.live):
            failed = [p.record.error for p in self.live if p.record.error]
            assert not failed, failed
            assert time.monotonic() < deadline, "peers did not all get a hello in time"
            await asyncio.sleep(0.05)

    def devices(self, tenant_index: int, peers: list[tuple[int, str, str, int]] = PEERS) -> list[str]:
        return sorted({d for t, d, _, _ in peers if t == tenant_index}) + OFFLINE_DEVICES

    def tenant_spec(self, index: int) -> list[Any]:
        slug = self.slugs[index]
        return [slug, self.tenants[slug], self.devices(index)]

    def start_producer(self, rate: int = RATE_PER_SEC) -> procs.Proc:
        journal = self.work_dir / f"journal-producer-{len(self.journals)}.jsonl"
        self.journals.append(journal)
        spec = {"tenants": [self.tenant_spec(0), self.tenant_spec(1)], "rate": rate, "prefix": f"s{self.tag}",
                "seed": 7}
        proc = self.agent(f"producer-{len(self.producers)}", "produce", spec, journal)
        self.producers.append(proc)
        return proc

    def journal(self, name: str) -> Path:
        path = self.work_dir / f"journal-{name}.jsonl"
        self.journals.append(path)
        return path

    async def wait_produced(self, count: int, timeout: float = 20.0) -> None:
        """Wait until the producers have committed ``count`` events (bounded)."""
        deadline = time.monotonic() + timeout
        while len(load_journal(self.journals)) < count:
            for proc in self.producers:
                assert proc.alive(), proc.log()[-2000:]
            assert time.monotonic() < deadline, f"the producer did not commit {count} events in {timeout}s"
            await asyncio.sleep(0.1)

    async def run_for(self, seconds: float) -> None:
        """Let the load run; fail early if a peer's SDK gave up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            failed = [p.record.error for p in self.live if p.record.error]
            assert not failed, failed

    # --- the end ----------------------------------------------------------------------

    async def finish(self, drain_timeout: float = DRAIN_TIMEOUT_SECS) -> dict[str, Any]:
        """Stop the producers, wait (bounded) until every committed event is assigned and
        every peer has what it is owed, stop the peers, and verify."""
        self.check_alive()
        for proc in self.producers:
            await asyncio.to_thread(proc.stop, 15)
        self.checker.journal = load_journal(self.journals)
        deadline = time.monotonic() + drain_timeout
        started = time.monotonic()
        while True:
            self.checker.truth = await asyncio.to_thread(load_truth, self.dsn, self.tenants.values())
            unassigned = sum(1 for r in self.checker.truth.values() if r.offset is None)
            if not unassigned and self.checker.pending() == 0:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        drain_s = round(time.monotonic() - started, 2)
        for peer in self.live:
            await peer.stop()
        self.checker.truth = await asyncio.to_thread(load_truth, self.dsn, self.tenants.values())
        report = self.checker.verify()
        report["drain_s"] = drain_s
        frames = sum(p.client.frames_seen for p in self.live)
        assert frames > 0, "the recording client saw no frame: is TyrumClient._handle_frame still called?"
        return report

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for peer in self.live:
            await peer.stop()
        for front in self.fronts:
            await front.close()
        await asyncio.to_thread(self.cluster.stop)
