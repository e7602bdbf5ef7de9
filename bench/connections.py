"""Connections: idle peers on one edge — RSS per connection and connect-storm time.

Starts one daphne edge (as the Dockerfile does, with its open-files limit raised) on a scratch
database and Redis; warms it with a few peers; then ``--peers`` peers (10 tenants, one device
each) connect at once from several load-client processes, each with ``--concurrency``
handshakes in flight. Reported: the storm time and rate, failures, the edge's RSS before and
after (from /proc) and per connection, its RSS and CPU after an idle period (heartbeats and
head checks keep running), and Redis's memory for the subscriptions.

    .venv/bin/python bench/connections.py [--peers 10000] [--pools 4] [--concurrency 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import load  # noqa: E402

from harness import data, scratch  # noqa: E402
from harness.cluster import Cluster  # noqa: E402

WARM_PEERS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--pools", type=int, default=4, help="load-client processes")
    parser.add_argument("--concurrency", type=int, default=25, help="handshakes in flight per load client")
    parser.add_argument("--idle-secs", type=float, default=6.0)
    parser.add_argument("--budget", type=float, default=150.0, help="no handshake starts after this many seconds")
    args = parser.parse_args()

    db = scratch.scratch_name("tyrum_bench_conn")
    url = common.scratch_database(db)
    pfx = common.prefix("conn")
    common.setup_django(url, pfx)
    env = common.service_env(url, pfx)
    tenants = data.make_tenants(args.tenants)
    total = args.peers + WARM_PEERS
    tokens = data.make_tokens([tenants[i % len(tenants)] for i in range(total)], [f"dev-{i}" for i in range(total)])
    common.LOGS.mkdir(parents=True, exist_ok=True)
    # The edge as the Dockerfile runs it, with a raised open-files limit; logs afresh each run.
    cluster = Cluster(log_dir=common.LOGS, env=env, append_logs=False, raise_nofile=True)
    try:
        cluster.start_edges(["conn-edge"])
        ws = cluster.urls[0]
        pools = load.Pools(cluster, args.pools, env, tag="conn-pool")
        try:
            row = measure(args, pools, cluster.edges[0].pid, db, ws, tokens)
        finally:
            # SIGKILL first: a clean drain would close and unregister every socket one by one.
            cluster.kill_edge(0)
            pools.exit()
    finally:
        cluster.stop()
        scratch.drop_database(db)
    common.report(
        f"connections — idle peers on one edge ({args.pools} load-client processes, "
        f"{args.concurrency} handshakes in flight each)",
        [row],
        [
            "peers",
            "connected",
            "failed",
            "retries",
            "storm_s",
            "connects_per_s",
            "rss_before_mb",
            "rss_after_mb",
            "rss_idle_mb",
            "kb_per_conn",
            "edge_idle_cpu_pct",
            "redis_kb_per_conn",
            "open_fds",
        ],
        row["notes"],
    )
    if row["errors"]:
        print("errors:", row["errors"])
    print(common.machine_line())
    print("wrote", common.write("connections", [row], {"args": vars(args)}))


def measure(args: Any, pools: load.Pools, edge_pid: int, db: str, ws: str, tokens: list[str]) -> dict[str, Any]:
    import redis

    meter = common.CpuMeter(db, {"edge": lambda: [edge_pid], "peers": lambda: pools.pids})
    warm = pools.ask(
        [{"cmd": "connect", "peers": [[ws, t] for t in tokens[:WARM_PEERS]], "concurrency": 5}]
        + [{"cmd": "connect", "peers": [], "concurrency": 1}] * (len(pools.procs) - 1),
        timeout=60,
    )
    time.sleep(1.0)
    rss_before = common.rss_bytes(edge_pid)
    r = redis.Redis.from_url(common.REDIS_URL, socket_timeout=5)
    redis_before = int(r.info("memory")["used_memory"])
    a = meter.snap()
    storm = pools.connect([(ws, t) for t in tokens[WARM_PEERS:]], concurrency=args.concurrency, budget=args.budget)
    b = meter.snap()
    rss_after = common.rss_bytes(edge_pid)
    time.sleep(args.idle_secs / 3)
    c = meter.snap()
    time.sleep(args.idle_secs)
    d = meter.snap()
    rss_idle = common.rss_bytes(edge_pid)
    redis_after = int(r.info("memory")["used_memory"])
    open_fds = len(list(Path(f"/proc/{edge_pid}/fd").iterdir()))
    still_open = pools.counts()["open"]
    storm_cpu = meter.delta(a, b)
    idle_cpu = meter.delta(c, d)
    n = storm["connected"]
    notes = common.notes_for(storm_cpu, ["peers"], "connect storm")
    if n < args.peers:
        why = f"{storm['skipped']} not tried within the {args.budget:g}s budget" if storm["skipped"] else ""
        notes.append(f"only {n} of {args.peers} peers connected: {why} {storm['errors'] or ''}".rstrip())
    if still_open < n + warm[0]["connected"]:
        notes.append(f"{n + warm[0]['connected'] - still_open} sockets closed while idle")
    return {
        "peers": args.peers,
        "connected": n,
        "failed": storm["failed"],
        "skipped": storm["skipped"],
        "retries": storm["retries"],
        "errors": storm["errors"],
        "storm_s": storm["secs"],
        "connects_per_s": n / storm["secs"] if storm["secs"] else float("nan"),
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
        "rss_idle_mb": rss_idle / 2**20,
        "kb_per_conn": (max(rss_after, rss_idle) - rss_before) / 1024 / max(1, n),
        "edge_idle_cpu_pct": 100 * idle_cpu["edge"] / idle_cpu["wall_s"],
        "redis_kb_per_conn": (redis_after - redis_before) / 1024 / max(1, n),
        "open_fds": open_fds,
        "still_open": still_open,
        "storm_cpu": storm_cpu,
        "idle_cpu": idle_cpu,
        **common.cpu_columns(storm_cpu, ["edge", "peers", "redis", "postgres", "other"]),
        "notes": notes,
    }


if __name__ == "__main__":
    main()
