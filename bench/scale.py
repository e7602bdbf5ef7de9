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
        [--seconds 5] [--idle-secs <ping interval>] [--profile SECS]

``--ping-interval S``: the edge's daphne ``--ping-interval`` (20 s, as deployed; a long one
shows what the pings cost). ``--profile SECS``: py-spy on the edge for SECS seconds of the last idle phase (summary
printed, raw profile in bench/logs/).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=50, help="handshakes in flight per load client")
    parser.add_argument("--budget", type=float, default=150.0, help="no handshake starts after this many seconds")
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the edge this many idle seconds")
    parser.add_argument("--ping-interval", type=int, default=20, help="the edge's daphne --ping-interval")
    args = parser.parse_args()
    if args.idle_secs is None:
        args.idle_secs = float(args.ping_interval)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    connects: list[dict[str, Any]] = []
    profile_text = ""
    with BenchCluster(
        "scale", peers=sizes[-1], tenants=args.tenants, edges=1, pools=args.pools, ping_interval=args.ping_interval
    ) as c:
        assert c.pools is not None and c.cluster is not None
        tenants = data.make_tenants(args.tenants)
        devices = [f"dev-{i}" for i in range(sizes[-1])]
        pairs, _ = c.peer_set(tenants, devices, "all")
        edge_pid = c.cluster.edges[0].pid
        connected = 0
        first_receivers = 0
        for size in sizes:
            storm = c.pools.connect(pairs[connected:size], concurrency=args.concurrency, budget=args.budget)
            connects.append({"peers": size, **{k: storm[k] for k in ("connected", "failed", "secs")}})
            if storm["connected"] < size - connected:
                notes.append(f"{size}: only {storm['connected']} of {size - connected} new peers connected")
            connected = size
            time.sleep(args.settle_secs)  # the storm's last hellos and the first heartbeat after it
            rows.append(idle(c, size, args.idle_secs))
            idle_pct = rows[-1]["edge_cpu_pct"]
            if args.profile and size == sizes[-1]:
                profile_text = profile_edge(edge_pid, args.profile)
            receivers = max(1, round(size * args.receiving))
            if size != sizes[0] and first_receivers:  # the same work as at the smallest size
                rows.append(work(c, args, tenants, size, first_receivers, "same work", notes, idle_pct))
            rows.append(work(c, args, tenants, size, receivers, "work", notes, idle_pct))
            first_receivers = first_receivers or receivers
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
    if profile_text:
        print(f"\npy-spy, edge idle with {sizes[-1]} peers:\n{profile_text}")
    print(common.machine_line())
    print("wrote", common.write("scale", rows, {"args": vars(args), "connects": connects, "secs": total}))


def idle(c: BenchCluster, size: int, secs: float) -> dict[str, Any]:
    a = c.meter.snap()
    time.sleep(secs)
    cpu = c.meter.delta(a, c.meter.snap())
    return {
        "peers": size,
        "phase": "idle",
        "receivers": 0,
        "edge_cpu_pct": 100 * cpu["edges"] / cpu["wall_s"],
        "cpu_relay": cpu["relay"],
        "cpu_peers": cpu["peers"],
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
    row, _, _ = c.phase(label, rate, "producer_proc.py", argvs, seconds=args.seconds, by_id=True)
    cpu = row["cpu"]
    notes += row.pop("notes")
    return {
        **row,
        "peers": size,
        "receivers": receivers,
        "edge_cpu_pct": 100 * cpu["edges"] / cpu["wall_s"],
        "edge_us_per_frame": 1e6 * cpu["edges"] / max(1, row["received"]),
        "edge_us_per_frame_above_idle": 1e6
        * max(0.0, cpu["edges"] - idle_pct / 100 * cpu["wall_s"])
        / max(1, row["received"]),
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
