"""End-to-end latency: producer commit → event frame at the peer, device-targeted.

Starts 2 daphne edges and 1 relay (real processes) on a scratch PostgreSQL database and
Redis; connects peers (one device each) spread over the edges; a producer thread publishes
device events at a fixed rate, one per transaction, and records each commit time; peers
record arrival times. Reports p50/p90/p99/max and lost, and the CPU of every process.

    .venv/bin/python bench/e2e_latency.py [--peers 200] [--rates 500,2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=common.ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=200)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--rates", default="500,2000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--base-port", type=int, default=18700)
    args = parser.parse_args()

    url = common.scratch_database("tyrum_bench_e2e")
    prefix = f"benche2e{os.getpid()}"
    common.setup_django(url, prefix)
    from django.db import transaction

    from backplane import auth, outbox
    from backplane.models import Tenant

    tenants = [Tenant.objects.create(slug=f"t{i}", name=f"T{i}") for i in range(args.tenants)]
    peers: list[tuple[Any, str, str]] = []
    for i in range(args.peers):
        tenant = tenants[i % len(tenants)]
        device = f"dev-{i}"
        peers.append((tenant, device, auth.create_token(tenant, device, "node")[1]))

    logs = common.RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": common.REDIS_URL,
        "BACKPLANE_CHANNEL_PREFIX": prefix,
        "LOG_LEVEL": "WARNING",
    }
    ports = [args.base_port, args.base_port + 1]
    procs = {
        f"edge-{i}": start(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(p), "tyrum.asgi:application"],
            {**env, "EDGE_ID": f"bench-edge-{i}"},
            logs / f"edge-{i}.log",
        )
        for i, p in enumerate(ports)
    }
    procs["relay"] = start([sys.executable, "manage.py", "run_backplane"], env, logs / "relay.log")
    try:
        for p in ports:
            wait_port(p)
        results = asyncio.run(run_rates(args, peers, ports, procs, transaction, outbox))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
    cols = [
        "rate",
        "sent",
        "received",
        "lost",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "achieved_rate",
        "cpu_edges",
        "cpu_relay",
        "cpu_bench",
        "p50_to_assigned_ms",
        "p50_assigned_to_marked_ms",
        "p50_marked_to_peer_ms",
    ]
    print(
        f"e2e latency — {args.peers} peers on 2 edges, {args.tenants} tenants, device events, "
        f"{args.seconds:.0f}s per rate"
    )
    print(common.table(results, cols))
    for r in results:
        if r["cpu_bench"] > 0.9 * r["seconds"]:
            print(
                f"note: at {r['rate']} ev/s the load client used {r['cpu_bench']:.1f} CPU-s of "
                f"{r['seconds']:.1f}s: it was the bottleneck"
            )
    m = common.machine()
    print(f"machine: {m['cpu']} × {m['cores']} cores")
    print("wrote", common.write("e2e_latency", results, {"args": vars(args)}))


async def run_rates(
    args: Any, peers: list[Any], ports: list[int], procs: dict[str, Any], transaction: Any, outbox: Any
) -> list[dict[str, Any]]:
    from websockets.asyncio.client import connect

    arrivals: dict[str, float] = {}
    sockets = []
    for i, (_, _, token) in enumerate(peers):
        ws = await connect(
            f"ws://127.0.0.1:{ports[i % len(ports)]}/ws",
            subprotocols=["tyrum-v1"],
            additional_headers={"Authorization": f"Bearer {token}"},
            max_queue=None,
        )
        await ws.recv()  # hello
        await ws.send('{"type":"ping"}')
        sockets.append(ws)

    async def reader(ws: Any) -> None:
        try:
            async for raw in ws:
                now = time.time()
                if raw.startswith('{"type":"event"'):
                    arrivals.setdefault(json.loads(raw)["event"]["event_id"], now)
        except Exception:
            return

    readers = [asyncio.create_task(reader(ws)) for ws in sockets]
    await asyncio.sleep(0.5)
    results = []
    for rate in [int(r) for r in args.rates.split(",")]:
        commits: dict[str, float] = {}
        cpu0 = {name: common.cpu_seconds(p.pid) for name, p in procs.items()}
        me0 = time.process_time()
        stop_at = time.monotonic() + args.seconds

        def produce() -> None:
            interval = 1.0 / rate
            nxt = time.monotonic()
            n = 0
            while time.monotonic() < stop_at:
                tenant, device, _ = peers[random.randrange(len(peers))]
                with transaction.atomic():
                    eid = outbox.publish(tenant, "bench.tick", {"n": n}, device=device)
                commits[eid] = time.time()
                n += 1
                nxt += interval
                delay = nxt - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

        started = time.monotonic()
        thread = threading.Thread(target=produce)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        await asyncio.sleep(3.0)  # let stragglers arrive
        lat = [(arrivals[e] - t) * 1000 for e, t in commits.items() if e in arrivals]
        stages = await asyncio.to_thread(_stages, commits, arrivals)
        cpu1 = {name: common.cpu_seconds(p.pid) for name, p in procs.items()}
        results.append(
            {
                "rate": rate,
                "seconds": elapsed,
                "sent": len(commits),
                "received": len(lat),
                "lost": len(commits) - len(lat),
                "achieved_rate": len(commits) / elapsed,
                "p50_ms": common.percentile(lat, 50),
                "p90_ms": common.percentile(lat, 90),
                "p99_ms": common.percentile(lat, 99),
                "max_ms": max(lat) if lat else float("nan"),
                "cpu_edges": sum(cpu1[k] - cpu0[k] for k in cpu1 if k.startswith("edge")),
                "cpu_relay": cpu1["relay"] - cpu0["relay"],
                "cpu_bench": time.process_time() - me0,
                **stages,
            }
        )
    for t in readers:
        t.cancel()
    for ws in sockets:
        await ws.close()
    return results


def _stages(commits: dict[str, float], arrivals: dict[str, float]) -> dict[str, float]:
    """Median time spent commit→assigned, assigned→marked forwarded, marked→at the peer (ms)."""
    from django.db import connections

    from backplane.models import OutboxItem

    rows = OutboxItem.objects.filter(event_id__in=list(commits)).values_list("event_id", "assigned_at", "forwarded_at")
    a, f, d = [], [], []
    for eid, assigned, forwarded in rows:
        if assigned is None or forwarded is None or eid not in arrivals:
            continue
        a.append((assigned.timestamp() - commits[eid]) * 1000)
        f.append((forwarded.timestamp() - assigned.timestamp()) * 1000)
        d.append((arrivals[eid] - forwarded.timestamp()) * 1000)
    connections.close_all()
    return {
        "p50_to_assigned_ms": common.percentile(a, 50),
        "p50_assigned_to_marked_ms": common.percentile(f, 50),
        "p50_marked_to_peer_ms": common.percentile(d, 50),
    }


if __name__ == "__main__":
    main()
