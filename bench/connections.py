"""Connections: connect storms — idle peers on one edge, and the storm after an edge SIGKILL.

``one edge``: starts one daphne edge (as the Dockerfile does, with its open-files limit
raised) on a scratch database and Redis; warms it with a few peers; then ``--peers`` peers
(10 tenants, one device each) connect at once from several load-client processes, each with
``--concurrency`` handshakes in flight. Reported: the storm time and rate, failures, the
edge's RSS before and after (from /proc) and per connection, its RSS and CPU after an idle
period (heartbeats and head checks keep running), and Redis's memory for the subscriptions.

``after a kill``: 2 edges and a relay, ``--kill-peers`` peers on each; device events are
committed at ``--kill-rate`` per second while one edge is SIGKILLed and restarted at once (as
a supervisor would), and its peers reconnect after 0.5–1.5 s — through the "load balancer":
each load client tries the edges in its own order, the survivor or the restarted one first —
and resume. Reported: kill → every peer back (connected again and resumed), how many were
back within 15 s, events lost and duplicated, and the CPU of each role during the storm.
``--kill-peers 0`` leaves it out.

    .venv/bin/python bench/connections.py [--peers 10000] [--pools 4] [--concurrency 25]
        [--kill-peers 10000] [--kill-rate 200] [--phase both|one-edge|kill]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import load  # noqa: E402
from cluster import BenchCluster  # noqa: E402

from harness import data, scratch  # noqa: E402
from harness.cluster import Cluster  # noqa: E402

WARM_PEERS = 10
# The target after a kill: every peer back within this many seconds (issue 17).
BACK_WITHIN_SECS = 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--pools", type=int, default=4, help="load-client processes")
    parser.add_argument("--concurrency", type=int, default=25, help="handshakes in flight per load client")
    # One ping interval (the edges' 20 s): any window that long holds exactly one ping of each
    # idle peer, so the idle CPU counts what the pings cost (a shorter one may hold none).
    parser.add_argument("--idle-secs", type=float, default=20.0)
    parser.add_argument("--budget", type=float, default=150.0, help="no handshake starts after this many seconds")
    parser.add_argument("--kill-peers", type=int, default=10_000, help="peers per edge after a kill (0: skip)")
    parser.add_argument("--kill-rate", type=float, default=200.0, help="device events/s during the kill's storm")
    parser.add_argument("--kill-seconds", type=float, default=20.0, help="sending time; the kill is 3 s in")
    parser.add_argument("--phase", choices=("both", "one-edge", "kill"), default="both")
    parser.add_argument("--row-out", default=None, help=argparse.SUPPRESS)  # a phase run as a child
    args = parser.parse_args()
    if args.row_out:  # one phase in this process (Django is set up once per process)
        row = one_edge(args) if args.phase == "one-edge" else after_kill(args)
        Path(args.row_out).write_text(json.dumps(row, default=str))
        return
    phases = [args.phase] if args.phase != "both" else ["one-edge"] + (["kill"] if args.kill_peers else [])
    rows = [run_phase(phase) for phase in phases]
    print(common.machine_line())
    print("wrote", common.write("connections", rows, {"args": vars(args)}))


def run_phase(phase: str) -> dict[str, Any]:
    """Run one phase as a child process (its own scratch database and Django set-up)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        child = subprocess.Popen([common.PY, __file__, *sys.argv[1:], "--phase", phase, "--row-out", out.name])
        try:
            rc = child.wait()
        except BaseException:  # interrupted (the suite's timeout): the child stops what it started
            child.send_signal(signal.SIGINT)
            child.wait(30)
            raise
        if rc != 0:
            raise SystemExit(f"connections.py --phase {phase} exited with {rc}")
        row: dict[str, Any] = json.loads(Path(out.name).read_text())
        return row


def one_edge(args: Any) -> dict[str, Any]:
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
    row["phase"] = "one edge"
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
    return row


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


def after_kill(args: Any) -> dict[str, Any]:
    """2 edges with ``--kill-peers`` peers each; one is SIGKILLed and restarted while device
    events are committed; its peers come back (to either edge) and resume."""
    per_edge = args.kill_peers
    with BenchCluster("connkill", peers=2 * per_edge, tenants=args.tenants, pools=args.pools) as c:
        assert c.cluster is not None and c.pools is not None
        cluster, pools = c.cluster, c.pools
        tenants = data.make_tenants(args.tenants)
        pairs, peers_file = c.peer_set(tenants, [f"dev-{i}" for i in range(2 * per_edge)], "kill")
        connect = pools.connect(pairs, concurrency=args.concurrency, budget=args.budget)
        print(
            f"after a kill: {connect['connected']} peers connected to 2 edges in {connect['secs']:.1f}s "
            f"({connect['retries']} retried, {connect['failed']} failed {connect['errors'] or ''})",
            flush=True,
        )
        # A load balancer in front of both edges: half the load clients try the survivor
        # first, half the restarted edge (refused while it starts: then the other).
        n = len(pools.procs)
        pools.ask(
            [{"cmd": "failover", "urls": [c.ws_url(k), c.ws_url(k + 1)], "delay": [0.5, 1.5]} for k in range(n)],
            timeout=30,
        )
        restarted: dict[str, float] = {}

        def kill_and_restart() -> None:
            c.killed_at = time.time()
            cluster.kill_edge(1)
            cluster.restart_edge(1)  # as a supervisor would: listening again in a second or two
            restarted["at"] = time.time()

        c._kill_last_edge = kill_and_restart  # type: ignore[method-assign]  # the phase's kill timer
        argvs = c.producer_argvs(args.kill_rate, args.kill_seconds, peers_file, 1, "device")
        row, got, _ = c.phase(
            "after a kill",
            args.kill_rate,
            "producer_proc.py",
            argvs,
            seconds=args.kill_seconds,
            kill_edge_at=3.0,
            drain_secs=60,  # until every peer of the killed edge has resumed: late is not lost
            flat_secs=3,
            until_resumed=True,
        )
        counts = pools.counts()
    killed_at = getattr(c, "killed_at", None)
    fo = got["failovers"]
    back = sorted(f["resumed_at"] - killed_at for f in fo if killed_at and f["resumed_at"])
    storm = row["cpu"]
    row.update(
        {
            "phase": "after a kill",
            "peers": 2 * per_edge,
            "connected": counts["open"],
            "peers_failed_over": len(fo),
            "peers_back": len(back),
            "back_within_target": sum(1 for b in back if b <= BACK_WITHIN_SECS),
            "kill_to_all_back_s": back[-1] if back and len(back) == len(fo) else float("nan"),
            "kill_to_back_p50_s": common.percentile(back, 50) if back else float("nan"),
            "restart_s": restarted["at"] - killed_at if killed_at and "at" in restarted else float("nan"),
            "reconnects_per_s": len(back) / back[-1] if back else float("nan"),
            "all_recovered": bool(fo)
            and all(f["resumed"] and all(s.get("recovered") for s in f["resumed"].values()) for f in fo),
            "initial_connect_s": connect["secs"],
            "storm_cpu": storm,
        }
    )
    if len(back) < len(fo):
        row["notes"].append(f"{len(fo) - len(back)} of {len(fo)} peers of the killed edge did not come back")
        for f in [f for f in fo if not f["resumed_at"]][:5]:  # what each did after its last hello
            greeted = f["hello_at"] - killed_at if killed_at and f.get("hello_at") else None
            when = "never" if greeted is None else f"{greeted:.2f}s after the kill"
            row["notes"].append(
                f"not back: open {f.get('open')}, greeted {when} "
                f"at {f.get('url')}, resume of {f.get('resume_streams')} streams sent, "
                f"{f.get('frames_after_hello')} frames after, the last control frame {f.get('last_control')!r}"
            )
    common.report(
        f"connections — storm after an edge SIGKILL: 2 edges × {per_edge} peers, {args.kill_rate:g} device "
        f"events/s for {args.kill_seconds:g}s, edge 1 killed 3 s in and restarted; its peers come back "
        f"to either edge after 0.5–1.5 s and resume",
        [row],
        [
            "peers",
            "connected",
            "peers_failed_over",
            "peers_back",
            "back_within_target",
            "kill_to_back_p50_s",
            "kill_to_all_back_s",
            "reconnects_per_s",
            "restart_s",
            "sent",
            "lost",
            "dupes",
            "out_of_order",
            "all_recovered",
            "cpu_edges",
            "cpu_peers",
            "cpu_postgres",
            "cpu_redis",
            "cpu_relay",
        ],
        row["notes"],
    )
    return row


if __name__ == "__main__":
    main()
