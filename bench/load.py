"""Driving the load from a benchmark: peer pools, producer and sender processes, drains.

``Pools`` talks to ``peers.py`` processes; ``run_senders`` runs ``producer_proc.py`` (through
the outbox) or ``floor_proc.py`` (straight into the channel layer) and merges what they sent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common

from harness.cluster import Cluster

BENCH = Path(__file__).resolve().parent


def client_argv() -> tuple[list[str], dict[str, str], str]:
    """The load client to run: (argv, extra env, its name).

    ``BENCH_CLIENT=node`` (the default when Node is installed) runs ``peers.js``: the
    Socket.IO side is driven by Node clients too, and a Python client tops out below what the
    edges send in the fan-out. ``BENCH_PEERS_WS=raw`` (the default) speaks WebSocket over
    ``net.Socket`` by hand and needs nothing but Node; ``BENCH_PEERS_WS=ws`` goes through the
    ``ws`` package from the Socket.IO peer's dependencies (installed with ``npm ci`` on first
    use, like ``socketio_peer.py`` does; 0028).
    ``BENCH_CLIENT=python`` runs ``peers.py`` (the only choice without Node).
    """
    choice = os.environ.get("BENCH_CLIENT", "auto")
    node = shutil.which("node")
    if choice != "python" and node:
        impl = "ws" if os.environ.get("BENCH_PEERS_WS") == "ws" else "raw"
        # The raw client needs nothing but Node; only the `ws` variant needs the package.
        modules = node_modules() if impl == "ws" else None
        if impl == "raw" or modules is not None:
            extra = {"BENCH_PEERS_WS": impl, **({"BENCH_NODE_MODULES": str(modules)} if modules else {})}
            return [node, str(BENCH / "peers.js")], extra, f"node ({impl})"
    if choice == "node":
        raise SystemExit("BENCH_CLIENT=node: no node, or (BENCH_PEERS_WS=ws) the `ws` package could not be installed")
    return [common.PY, str(BENCH / "peers.py")], {}, "python (websockets)"


def node_modules() -> Path | None:
    """The Socket.IO peer's node_modules (with ``ws``), installed on first use; or None."""
    import socketio_peer

    modules = socketio_peer.COPY / "node_modules"
    if not (modules / "ws").is_dir() and socketio_peer.SOURCE.is_dir() and shutil.which("npm"):
        socketio_peer.sync_copy()
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=socketio_peer.COPY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    return modules if (modules / "ws").is_dir() else None


def _raise_nofile() -> None:
    """In the child before exec: open-files soft limit up to the hard limit (10 000 peers)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Pools:
    """``n`` load-client processes (``peers.js`` or ``peers.py``, see ``client_argv``);
    peer ``i`` goes to pool ``i % n``."""

    def __init__(self, cluster: Cluster, n: int, env: dict[str, str], tag: str = "pool") -> None:
        self.tag = tag
        argv, extra, self.client = client_argv()
        self.procs = [
            cluster.spawn(
                f"{tag}-{i}",
                argv,
                {**env, **extra},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=_raise_nofile,  # Node cannot raise its own open-files limit
            ).popen
            for i in range(n)
        ]
        self.threads = ThreadPoolExecutor(max_workers=n)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def ask(self, messages: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """Send one command to each pool, return their answers (bounded by ``timeout``)."""
        for proc, msg in zip(self.procs, messages, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(msg) + "\n")
            proc.stdin.flush()
        futures = [self.threads.submit(p.stdout.readline) for p in self.procs]  # type: ignore[union-attr]
        out = []
        deadline = time.monotonic() + timeout
        for proc, fut in zip(self.procs, futures, strict=True):
            line = fut.result(timeout=max(0.1, deadline - time.monotonic()))
            if not line:
                raise RuntimeError(f"load client {proc.pid} exited (see its log in {common.LOGS})")
            out.append(json.loads(line))
        return out

    def all(self, msg: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
        return self.ask([msg] * len(self.procs), timeout)

    def connect(self, pairs: list[tuple[str, str]], concurrency: int = 50, budget: float = 150) -> dict[str, Any]:
        """Connect peers (url, token) spread over the pools; return counts and the storm time
        (until the last handshake done). No handshake starts after ``budget`` seconds."""
        n = len(self.procs)
        shares = [[list(pairs[i]) for i in range(k, len(pairs), n)] for k in range(n)]
        msgs = [{"cmd": "connect", "peers": s, "concurrency": concurrency, "budget": budget} for s in shares]
        answers = self.ask(msgs, budget + 90)
        errors: dict[str, int] = {}
        for a in answers:
            for k, v in a["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {
            "connected": sum(a["connected"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "skipped": sum(a["skipped"] for a in answers),
            "retries": sum(a["retries"] for a in answers),
            "errors": errors,
            "secs": max(a["secs"] for a in answers),
        }

    def received(self) -> int:
        return sum(a["received"] for a in self.all({"cmd": "count"}))

    def counts(self) -> dict[str, int]:
        answers = self.all({"cmd": "count"})
        return {k: sum(a[k] for a in answers) for k in answers[0]}

    def collect(self, sent: dict[str, float], by_id: bool = False) -> dict[str, Any]:
        answers = self.all({"cmd": "collect", "sent": sent, "by_id": by_id}, timeout=120)
        lat: list[float] = []
        arrivals: dict[str, float] = {}
        pool_of: dict[str, int] = {}  # by_id: which pool each event arrived in
        for i, a in enumerate(answers):
            lat += a["latencies_ms"]
            arrivals.update(a["arrivals"])
            pool_of.update(dict.fromkeys(a["arrivals"], i))
        return {
            "pool_of": pool_of,
            "probes": [a.get("probe") for a in answers],  # peers.js with BENCH_PEERS_PROBE=1
            "latencies_ms": lat,
            "arrivals": arrivals,
            "last_arrival": max(a["last_arrival"] for a in answers),
            "stray": sum(a["stray"] for a in answers),
            "dupes": sum(a["dupes"] for a in answers),
            "reordered": sum(a["reordered"] for a in answers),
            "failovers": [f for a in answers for f in a["failovers"]],
            "odd": [o for a in answers for o in a["odd"]],
        }

    def wait_drain(
        self, expected: int, max_secs: float = 10.0, flat_secs: float = 1.5, until_resumed: bool = False
    ) -> int:
        """Wait until ``expected`` arrivals, or nothing new for ``flat_secs``, or ``max_secs``.

        ``until_resumed``: while a dropped peer has not resumed yet, quiet is not the end.
        """
        deadline = time.monotonic() + max_secs
        last, flat_since = -1, time.monotonic()
        got = 0
        while time.monotonic() < deadline:
            counts = self.counts()
            got = counts["received"]
            if got >= expected:
                break
            if got != last:
                last, flat_since = got, time.monotonic()
            elif time.monotonic() - flat_since > flat_secs:
                if not until_resumed or counts["resumed"] >= counts["dropped"]:
                    break
            time.sleep(0.2)
        return got

    def disconnect(self) -> None:
        self.all({"cmd": "disconnect"}, timeout=60)

    def exit(self) -> None:
        try:
            self.all({"cmd": "exit"}, timeout=30)
        except Exception:
            pass
        self.threads.shutdown(wait=False, cancel_futures=True)


def run_senders(script: str, argv_for: list[list[str]], timeout: float) -> dict[str, Any]:
    """Run sender processes (one per argv) to completion; merge their reports.

    Each prints one JSON object: {"sent": {id: t}, "start": t, "end": t, "cpu_s": s, ...}.
    """
    procs = [
        subprocess.Popen([common.PY, str(BENCH / script), *argv], cwd=common.ROOT, stdout=subprocess.PIPE)
        for argv in argv_for
    ]
    reports = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"{script} exited with {p.returncode}")
            reports.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    sent: dict[str, float] = {}
    target: dict[str, str] = {}
    for r in reports:
        sent.update(r["sent"])
        target.update(r.get("target", {}))
    return {
        "sent": sent,
        "target": target,
        "start": min(r["start"] for r in reports),
        "end": max(r["end"] for r in reports),
        "cpu_per_process": [round(r["cpu_s"], 2) for r in reports],
        "cpu_s": sum(r["cpu_s"] for r in reports),
        # The senders' own PostgreSQL backends (producer_proc.py), gone by the phase's end.
        "backend_pids": [r["backend_pid"] for r in reports if "backend_pid" in r],
        "backend_cpu_s": sum(r.get("backend_cpu_s", 0.0) for r in reports),
        "startup_cpu_s": sum(r.get("startup_cpu_s", 0.0) for r in reports),
        "reports": reports,
    }
