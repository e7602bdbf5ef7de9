"""Scale by size: one edge with 5 000, then 20 000 connected peers, 10 % of them receiving.

One daphne edge, one relay, a scratch database and Redis; peers (one device each, 10 tenants)
connect from load-client processes. At each size, in order:

- ``idle``: after ``--settle-secs`` (the first heartbeat after the connect writes the new
  peers' rows and positions), nothing is sent for ``--idle-secs`` (one ping interval by default:
  each idle peer is pinged exactly once in it); the edge's CPU (% of a core) is what its
  connected peers cost it with no work (pings, heartbeats, head checks);
- ``work``: device events through the outbox (producers → relay → edge) at
  ``--per-peer-rate`` events/s per receiving peer, to the first 10 % of the devices
  (``--receiving``): commit → frame at the peer (p50/p99, lost, as ``e2e_latency.py``
  measures it) and the edge's CPU per delivered frame;
- at the larger size also ``same work``: the smaller size's receivers at its rate, so the
  same work meets 4× the idle connections.

The cost should grow with the work, not with the connected peers: the idle CPU stays near
zero at both sizes, and CPU per frame above the idle rate (``edge_us_per_frame_above_idle``:
the window's edge CPU less the idle phase's rate at that size, per delivered frame) is about
the same for the same work at both sizes; ``edge_us_per_frame`` counts all of it.
The sizes run in one session (the larger one adds peers to the smaller), in under ~150 s once
handshakes run at ≥ 1 000/s (the connect time is reported).

    .venv/bin/python bench/scale.py [--sizes 5000,20000] [--receiving 0.1] [--per-peer-rate 0.5]
        [--seconds 5] [--idle-secs <ping interval>] [--profile SECS] [--trace] [--probe]

``--ping-interval S``: the edge's daphne ``--ping-interval`` (20 s, as deployed; a long one
shows what the pings cost). ``--profile SECS``: py-spy on the edge for SECS seconds of the last idle phase (summary
printed, raw profile in bench/logs/).

Every row has the run-queue waits (schedstat: ms per second runnable but waiting for a CPU) of
the edge and of the load clients. Where the slowest 1 % of a work window waits (0043):
``--trace`` sets ``TYRUM_HOP_TRACE`` (the largest size then stays 100 below the open-files
limit: the edge needs a descriptor for its trace file) and gives each step's median over the
slowest 1 % (``bench/hop_trace.py``'s steps: the edge's write against the peer's arrival);
``--probe`` has the load clients note their own GC pauses and stalls (``peers.js``,
``BENCH_PEERS_PROBE``) — how many of the slowest events arrived in one — and polls the edge's
heartbeats: the share of the slowest events, and of all, in flight in the 0.5 s after one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from cluster import BenchCluster  # noqa: E402

from harness import data  # noqa: E402

# bench/profile.py by its path: ``import profile`` may be the standard library's module.
_spec = importlib.util.spec_from_file_location("bench_profile", Path(__file__).resolve().parent / "profile.py")
assert _spec is not None and _spec.loader is not None
pyspy_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pyspy_profile)

TRACE_SPARE_FDS = 100

COLS = [
    "peers",
    "phase",
    "receivers",
    "rate",
    "sent",
    "received",
    "lost",
    "p50_ms",
    "p99_ms",
    "edge_cpu_pct",
    "edge_us_per_frame",
    "edge_us_per_frame_above_idle",
    "cpu_relay",
    "cpu_peers",
    "runq_edge_ms",
    "runq_peers_ms",
    "ok",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,20000", help="connected peers on the edge, ascending")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--receiving", type=float, default=0.1, help="share of the peers that receive events")
    parser.add_argument("--per-peer-rate", type=float, default=0.5, help="events/s per receiving peer")
    parser.add_argument("--seconds", type=float, default=5.0, help="sending time per work phase")
    # Default: one ping interval, so the window holds exactly one ping of each idle peer.
    parser.add_argument("--idle-secs", type=float, default=None)
    parser.add_argument(
        "--settle-secs", type=float, default=6.0, help="after connecting: one heartbeat writes the new rows"
    )
    parser.add_argument("--pools", type=int, default=4, help="load-client processes")
    parser.add_argument("--probe", action="store_true", help="the load clients note their GC pauses and stalls")
    parser.add_argument("--trace", action="store_true", help="TYRUM_HOP_TRACE: the tail's steps, edge vs peer")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes in flight per load client")
    parser.add_argument("--budget", type=float, default=150.0, help="no handshake starts after this many seconds")
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the edge this many idle seconds")
    parser.add_argument("--ping-interval", type=int, default=20, help="the edge's daphne --ping-interval")
    args = parser.parse_args()
    if args.idle_secs is None:
        args.idle_secs = float(args.ping_interval)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    if args.probe:
        os.environ["BENCH_PEERS_PROBE"] = "1"  # the load clients inherit it
    if args.trace:
        # The edge's trace file needs a descriptor: at the open-files limit its writes fail.
        cap = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - TRACE_SPARE_FDS
        if sizes[-1] > cap:
            sizes[-1] = cap
            print(f"--trace: the largest size capped at {cap} (descriptors for the edge's trace file)")

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    connects: list[dict[str, Any]] = []
    profile_text = ""
    with contextlib.ExitStack() as stack:
        if args.trace:  # the edge and relay inherit TYRUM_HOP_TRACE
            args.trace_dir = stack.enter_context(common.hop_trace_dir("scale-trace"))
        c = stack.enter_context(
            BenchCluster(
                "scale",
                peers=sizes[-1],
                tenants=args.tenants,
                edges=1,
                pools=args.pools,
                ping_interval=args.ping_interval,
            )
        )
        profile_text = run(c, args, sizes, rows, notes, connects)
    total = time.monotonic() - started
    common.report(
        f"scale — one edge, {args.receiving:.0%} of its peers receiving {args.per_peer_rate:g} ev/s each "
        f"({args.pools} load-client processes)",
        rows,
        COLS,
        notes
        + [f"connect {k['peers']} peers: {k['connected']} new in {k['secs']:.1f}s" for k in connects]
        + [f"ran {total:.0f}s"],
    )
    for r in rows:
        if r.get("tail"):
            print(f"{r['peers']} {r['phase']}: slowest 1 % — {json.dumps(r['tail'])}")
    if profile_text:
        print(f"\npy-spy, edge idle with {sizes[-1]} peers:\n{profile_text}")
    print(common.machine_line())
    args_out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print("wrote", common.write("scale", rows, {"args": args_out, "connects": connects, "secs": total}))


def run(
    c: BenchCluster,
    args: Any,
    sizes: list[int],
    rows: list[dict[str, Any]],
    notes: list[str],
    connects: list[dict[str, Any]],
) -> str:
    """Both sizes in one session; returns the py-spy summary (or "")."""
    assert c.pools is not None and c.cluster is not None
    profile_text = ""
    tenants = data.make_tenants(args.tenants)
    devices = [f"dev-{i}" for i in range(sizes[-1])]
    pairs, _ = c.peer_set(tenants, devices, "all")
    edge_pid = c.cluster.edges[0].pid
    args.runq_roles = {
        "edge": lambda: [edge_pid],
        "peers": lambda: c.pools.pids if c.pools else [],
    }
    connected = 0
    first_receivers = 0
    for size in sizes:
        storm = c.pools.connect(pairs[connected:size], concurrency=args.concurrency, budget=args.budget)
        connects.append({"peers": size, **{k: storm[k] for k in ("connected", "failed", "secs")}})
        if storm["connected"] < size - connected:
            notes.append(f"{size}: only {storm['connected']} of {size - connected} new peers connected")
        connected = size
        time.sleep(args.settle_secs)  # the storm's last hellos and the first heartbeat after it
        rows.append(idle(c, args, size, args.idle_secs))
        idle_pct = rows[-1]["edge_cpu_pct"]
        if args.profile and size == sizes[-1]:
            profile_text = profile_edge(edge_pid, args.profile)
        receivers = max(1, round(size * args.receiving))
        if size != sizes[0] and first_receivers:  # the same work as at the smallest size
            rows.append(work(c, args, tenants, size, first_receivers, "same work", notes, idle_pct))
        rows.append(work(c, args, tenants, size, receivers, "work", notes, idle_pct))
        first_receivers = first_receivers or receivers
    return profile_text


def runq_snap(args: Any) -> dict[str, float]:
    return {role: common.runq_seconds(get()) for role, get in args.runq_roles.items()}


def runq_columns(a: dict[str, float], b: dict[str, float], wall: float) -> dict[str, float]:
    """Run-queue wait by role, ms per second of the window."""
    return {f"runq_{role}_ms": 1000 * (b[role] - a[role]) / max(1e-9, wall) for role in a}


def idle(c: BenchCluster, args: Any, size: int, secs: float) -> dict[str, Any]:
    a, qa = c.meter.snap(), runq_snap(args)
    time.sleep(secs)
    cpu, qb = c.meter.delta(a, c.meter.snap()), runq_snap(args)
    return {
        "peers": size,
        "phase": "idle",
        "receivers": 0,
        "edge_cpu_pct": 100 * cpu["edges"] / cpu["wall_s"],
        "cpu_relay": cpu["relay"],
        "cpu_peers": cpu["peers"],
        **runq_columns(qa, qb, cpu["wall_s"]),
        "cpu": cpu,
        "ok": True,
    }


def work(
    c: BenchCluster,
    args: Any,
    tenants: list[Any],
    size: int,
    receivers: int,
    label: str,
    notes: list[str],
    idle_pct: float,
) -> dict[str, Any]:
    """Device events to the first ``receivers`` devices (device i is in tenant i % tenants).
    Per frame: all the edge's CPU in the window, and what it spent above its idle rate at this
    size (``idle_pct``, the connected peers' pings and heartbeats) — the work's own cost."""
    path = common.LOGS / f"scale-receivers-{receivers}.json"
    path.write_text(json.dumps([[str(tenants[i % len(tenants)].id), f"dev-{i}"] for i in range(receivers)]))
    rate = receivers * args.per_peer_rate
    argvs = c.producer_argvs(rate, args.seconds, path, args.producers, "device")
    if args.trace:
        for f in args.trace_dir.glob("*.jsonl"):
            f.unlink()
    assert c.pools is not None
    if args.probe:
        c.pools.collect({})  # the probes' totals from here: this window's
    watch = BeatWatch() if args.probe else None
    qa, t0 = runq_snap(args), time.monotonic()
    try:
        row, got, rep = c.phase(label, rate, "producer_proc.py", argvs, seconds=args.seconds, by_id=True)
    finally:
        beats = watch.stop() if watch else []
    qb, wall = runq_snap(args), time.monotonic() - t0
    cpu = row["cpu"]
    notes += row.pop("notes")
    tail = tail_probe(got, rep["sent"]) if args.probe else {}
    if args.probe:
        tail.update(beat_overlap(got["arrivals"], rep["sent"], beats))
    if args.trace:
        import hop_trace

        time.sleep(1.0)  # the processes write their trace lines every 0.5 s
        steps = hop_trace.summarize(rate, row, rep["sent"], got["arrivals"], args.trace_dir)["steps"]
        for name, step in steps.items():  # each step's median over the slowest 1 %, and over all
            tail[name] = round(step["tail"], 2)
            tail[f"{name}_p50"] = round(step["p50"], 2)
    return {
        **row,
        "peers": size,
        "receivers": receivers,
        **runq_columns(qa, qb, wall),
        "tail": tail,
        "edge_cpu_pct": 100 * cpu["edges"] / cpu["wall_s"],
        "edge_us_per_frame": 1e6 * cpu["edges"] / max(1, row["received"]),
        "edge_us_per_frame_above_idle": 1e6
        * max(0.0, cpu["edges"] - idle_pct / 100 * cpu["wall_s"])
        / max(1, row["received"]),
    }


class BeatWatch:
    """(``--probe``) The edge's heartbeats' start times, polled from its directory row
    (``heartbeat_at``) every POLL_SECS in a thread until ``stop``."""

    POLL_SECS = 0.05

    def __init__(self) -> None:
        import threading

        self.beats: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        from django.db import connection

        try:
            while not self.done.wait(self.POLL_SECS):
                with connection.cursor() as cur:
                    cur.execute("SELECT max(heartbeat_at) FROM backplane_edge")
                    at = cur.fetchone()[0]
                if at is not None and (not self.beats or at.timestamp() != self.beats[-1]):
                    self.beats.append(at.timestamp())
        finally:
            connection.close()

    def stop(self) -> list[float]:
        self.done.set()
        self.thread.join(10)
        return self.beats[1:]  # the first is the beat before the window


BEAT_SPAN_SECS = 0.5


def beat_overlap(arrivals: dict[str, float], sent: dict[str, float], beats: list[float]) -> dict[str, Any]:
    """The share of the slowest 1 % of events, and of all events, in flight (committed, not yet
    at the peer) at some moment of the BEAT_SPAN_SECS after a heartbeat's start."""
    lat = {e: t - sent[e] for e, t in arrivals.items() if e in sent}
    if not lat or not beats:
        return {"beats": len(beats)}
    cut = common.percentile(list(lat.values()), 99)

    def near(e: str) -> bool:
        return any(sent[e] <= b + BEAT_SPAN_SECS and arrivals[e] >= b for b in beats)

    slow = [e for e, v in lat.items() if v >= cut]
    return {
        "beats": len(beats),
        "slow_near_beat": round(sum(map(near, slow)) / len(slow), 3),
        "all_near_beat": round(sum(map(near, lat)) / len(lat), 3),
    }


def tail_probe(got: dict[str, Any], sent: dict[str, float]) -> dict[str, Any]:
    """The slowest 1 % of events against their load client's own stalls (``--probe``): how many
    arrived within 5 ms of a stall (a timer ≥ 2 ms late) or a GC pause of the process that
    read them, and each receiving process's GC and stall totals in the window."""
    lat = {e: 1000 * (t - sent[e]) for e, t in got["arrivals"].items() if e in sent}
    if not lat:
        return {}
    cut = common.percentile(list(lat.values()), 99)
    slow = [e for e, ms in lat.items() if ms >= cut]
    probes = got["probes"]
    windows: list[list[tuple[float, float]]] = [
        [
            (end - ms / 1000 - 0.005, end + 0.005)
            for end, ms, *_ in (p or {}).get("stalls", []) + (p or {}).get("gcs", [])
        ]
        for p in probes
    ]

    def in_stall(e: str) -> bool:
        t = got["arrivals"][e]
        return any(a <= t <= b for a, b in windows[got["pool_of"][e]])

    return {
        "slow": len(slow),
        "slow_in_client_stall": sum(in_stall(e) for e in slow),
        "client_gc_ms": [round(sum(g[1] for g in (p or {}).get("gcs", [])), 1) for p in probes],
        "client_gc_max_ms": [round(max([g[1] for g in (p or {}).get("gcs", [])] or [0]), 1) for p in probes],
        "client_stalls_over_5ms": [sum(1 for x in (p or {}).get("stalls", []) if x[1] >= 5) for p in probes],
        "client_stall_max_ms": [round(max([x[1] for x in (p or {}).get("stalls", [])] or [0]), 1) for p in probes],
    }


def profile_edge(pid: int, secs: float) -> str:
    out = common.LOGS / f"pyspy-scale-idle-{pid}.txt"
    subprocess.run(
        [str(pyspy_profile.PYSPY), "record", "-p", str(pid), "-d", str(int(secs)), "-f", "raw", "-o", str(out)]
        + ["--nonblocking"],
        check=True,
        timeout=secs + 60,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return pyspy_profile.summarise(out, 20)


if __name__ == "__main__":
    main()
