"""A benchmark session on a harness cluster (``harness.cluster.Cluster``): a scratch
database, tenants and tokens, daphne edges and a relay, load-client pools, and a phase
runner that measures one load level.

Every process is started by the harness and stopped by its PID on the way out, also on error.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import common
import load

from harness import data, procs, scratch
from harness.cluster import Cluster

# Time for sender processes to import Django and connect before they start together.
SENDER_START_SECS = 3.0


class BenchCluster:
    def __init__(
        self,
        tag: str,
        *,
        peers: int,
        tenants: int,
        edges: int = 2,
        pools: int = 2,
        analyze: bool = True,
        ping_interval: int = 20,
    ) -> None:
        self.tag = tag
        self.n_peers = peers
        self.n_tenants = tenants
        self.n_edges = edges
        self.n_pools = pools
        self.database = scratch.scratch_name(f"tyrum_bench_{tag}")
        self.cluster: Cluster | None = None
        self.pools: load.Pools | None = None
        self.analyze = analyze
        self.ping_interval = ping_interval  # daphne's --ping-interval

    # --- set-up -------------------------------------------------------------------------

    def __enter__(self) -> BenchCluster:
        self.url = common.scratch_database(self.database)
        self.prefix = common.prefix(self.tag)
        common.setup_django(self.url, self.prefix)
        self.env = common.service_env(self.url, self.prefix)
        common.LOGS.mkdir(parents=True, exist_ok=True)
        # Edges as the Dockerfile runs them, with a raised open-files limit; logs afresh each run.
        cluster = self.cluster = Cluster(log_dir=common.LOGS, env=self.env, append_logs=False, raise_nofile=True)
        try:
            cluster.start_edges([f"{self.tag}-edge-{i}" for i in range(self.n_edges)], self.ping_interval, wait=False)
            cluster.start_relay(f"{self.tag}-relay", wait=False)
            for proc, port in zip(cluster.edges, cluster.ports, strict=True):
                cluster.wait_edge(proc, port)
            self.pools = load.Pools(cluster, self.n_pools, self.env, tag=f"{self.tag}-pool")
            self.meter = common.CpuMeter(
                self.database,
                {
                    "edges": lambda: procs.pids(cluster.edges),
                    "relay": lambda: procs.pids(cluster.relays),
                    "peers": lambda: self.pools.pids if self.pools else [],
                },
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.pools is not None:
                self.pools.exit()
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            scratch.drop_database(self.database)

    @property
    def ports(self) -> list[int]:
        assert self.cluster is not None
        return self.cluster.ports

    def ws_url(self, i: int) -> str:
        return f"ws://127.0.0.1:{self.ports[i % len(self.ports)]}/ws"

    def peer_set(self, tenants: list[Any], devices: list[str], name: str) -> tuple[list[tuple[str, str]], Path]:
        """Tokens for ``devices`` (device ``i`` in ``tenants[i % len]``, on edge ``i % edges``);
        return (url, token) pairs and a peers file for the producers."""
        tenant_of = [tenants[i % len(tenants)] for i in range(len(devices))]
        tokens = data.make_tokens(tenant_of, devices)
        pairs = [(self.ws_url(i), tok) for i, tok in enumerate(tokens)]
        path = common.LOGS / f"{self.tag}-{name}-peers.json"
        path.write_text(json.dumps([[str(t.id), d] for t, d in zip(tenant_of, devices, strict=True)]))
        return pairs, path

    # --- measuring ----------------------------------------------------------------------

    def unforwarded(self) -> int:
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM backplane_outboxitem WHERE forwarded_at IS NULL")
            return int(cur.fetchone()[0])

    def analyze_tables(self) -> None:
        """Bring the planner's statistics up to date, as autovacuum does on a table that has
        lived a minute or more (this scratch database is seconds old; see docs/performance.md:
        on a fresh partition the relay's cached plans scan the whole partition per row)."""
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute("ANALYZE")

    def wait_outbox_drained(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.unforwarded() == 0:
                return True
            time.sleep(0.2)
        return False

    def phase(
        self,
        label: str,
        rate: float,
        script: str,
        argvs: list[list[str]],
        *,
        recipients: int = 1,
        seconds: float,
        kill_edge_at: float | None = None,
        by_id: bool = False,
        drain_secs: float = 10.0,
        flat_secs: float = 1.5,
        until_resumed: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Run senders at ``rate`` for ``seconds``; return (row, collected, sender report).

        ``recipients``: deliveries expected per event. A rate passes when ≥ 95 % of it was sent
        and received per second, nothing was lost, and p99 ≤ 1 s (as in the peer benchmark).
        """
        assert self.pools is not None
        if self.analyze:
            self.analyze_tables()
        a = self.meter.snap()
        start_at = time.time() + SENDER_START_SECS  # all senders start together, set up or not
        argvs = [[*argv, "--start-at", f"{start_at:.3f}"] for argv in argvs]
        killer = None
        if kill_edge_at is not None:  # seconds into the sending
            killer = threading.Timer(start_at + kill_edge_at - time.time(), self._kill_last_edge)
            killer.start()
        try:
            rep = load.run_senders(script, argvs, timeout=seconds + 90)
        finally:
            if killer is not None:
                killer.cancel()
        expected = len(rep["sent"]) * recipients
        self.pools.wait_drain(expected, max_secs=drain_secs, flat_secs=flat_secs, until_resumed=until_resumed)
        b = self.meter.snap()
        got = self.pools.collect(rep["sent"], by_id=by_id)
        # The senders' PostgreSQL backends by what they reported (they exit before b is taken),
        # and the senders' start-up as the harness's (bench), not as another's on the machine.
        reported = {"senders": rep["cpu_s"], "postgres": rep["backend_cpu_s"], "bench": rep["startup_cpu_s"]}
        cpu = self.meter.delta(a, b, reported, reported=set(rep["backend_pids"]))
        cpu["per_process"]["senders"] = rep["cpu_per_process"]
        lat = got["latencies_ms"]
        send_secs = max(1e-9, rep["end"] - rep["start"])
        recv_span = max(1e-9, got["last_arrival"] - rep["start"]) if lat else float("nan")
        row: dict[str, Any] = {
            "phase": label,
            "rate": rate,
            "secs": round(send_secs, 2),
            "sent": len(rep["sent"]),
            "sent_rate": len(rep["sent"]) / send_secs,
            "expected": expected,
            "received": len(lat),
            "lost": expected - len(lat),
            "dupes": got["dupes"],
            "out_of_order": got["reordered"],
            "recv_rate": len(lat) / recv_span if lat else 0.0,
            **common.latency_stats(lat),
        }
        if row["lost"] and by_id and recipients == 1:  # where did they go missing?
            missing = [e for e in rep["sent"] if e not in got["arrivals"]]
            row["lost_targets"] = len({rep["target"].get(e) for e in missing})
            row["lost_late_start"] = min(rep["sent"][e] for e in missing) - rep["start"]
        row["ok"] = bool(
            row["sent_rate"] >= 0.95 * rate
            and row["recv_rate"] >= 0.95 * rate * recipients
            and row["lost"] == 0
            and row["p99_ms"] <= 1000
        )
        row["cpu"] = cpu
        row.update(common.cpu_columns(cpu, ["edges", "relay", "peers", "senders", "redis", "postgres", "other"]))
        row["notes"] = common.notes_for(cpu, ["peers", "senders"], f"{label} {rate:g}/s")
        # Senders are paced: one that used ≥ 90 % of a core over its sending time was a limit.
        for i, used in enumerate(rep["cpu_per_process"]):
            if used >= common.BOTTLENECK_CORE_SHARE * send_secs:
                row["notes"].append(f"{label} {rate:g}/s: sender {i} used {used:.1f} CPU-s in {send_secs:.1f}s")
        if not row["ok"]:
            self.settle()
        return row, got, rep

    def settle(self, max_secs: float = 45.0) -> None:
        """Let a backlog (outbox, relay, edges' queues) clear so it does not leak into the next
        phase: the outbox drained and no late arrivals for 1.5 s; then forget those arrivals."""
        assert self.pools is not None
        deadline = time.monotonic() + max_secs
        self.wait_outbox_drained(max_secs)
        self.pools.wait_drain(1 << 60, max_secs=max(1.0, deadline - time.monotonic()), flat_secs=1.5)
        self.pools.collect({})

    def restart_edge(self, i: int) -> None:
        """Start edge ``i`` again on its port (after a kill)."""
        assert self.cluster is not None
        self.cluster.restart_edge(i)

    def _kill_last_edge(self) -> None:
        assert self.cluster is not None
        self.killed_at = time.time()
        self.cluster.kill_edge(self.n_edges - 1)

    def producer_argvs(self, rate: float, seconds: float, peers_file: Path, n: int, audience: str) -> list[list[str]]:
        return [
            [
                "--url",
                self.url,
                "--prefix",
                self.prefix,
                "--rate",
                str(rate / n),
                "--seconds",
                str(seconds),
                "--peers",
                str(peers_file),
                "--seed",
                str(seed),
                "--audience",
                audience,
            ]
            for seed in range(n)
        ]
