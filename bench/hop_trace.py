"""Where an event's time goes between its commit and its frame at the peer: a trace (issue 17, 3).

Runs the e2e phase of ``e2e_latency.py`` (device events through the outbox, 2 edges, one
relay, peers in load-client processes) with ``TYRUM_HOP_TRACE`` set, so the relay and the
edges note the time of each step of each batch (``backplane/hoptrace.py``), and joins them
per event with the producer's commit time, the outbox's ``assigned_at`` and the arrival at
the peer:

    commit → cycle     the start of the relay cycle that assigns the event (the two below)
    commit → ring      the doorbell's ring reaches the relay's listener
    ring → cycle       the relay's loop starts a cycle (its wake-up)
    cycle → assigned   the assignment transaction's start (``assigned_at``, PostgreSQL's clock)
    assigned → rows    the assignment's rows are in the relay's hands (the statement, commit)
    rows → rendered    frames and group messages built
    rendered → read    serialize (encrypt) + pipelined PUBLISH + Redis → the edge's reader task
    read → received    the edge's queue and loop turn to the delivery loop + decode (decrypt);
                       a batch joined with others piled up behind it (0051) notes its first's read
    received → offered the batch handed to its sockets (cursor, coalescer)
    offered → written  the end of the loop turn: the coalescer's send()
    written → peer     the kernel, the load client's loop and parsing

Each step's median and p99 (ms) per rate, and its median over the slowest 1 % of events
(where the e2e p99 is spent), as a table and ``bench/results/hop_trace.json``.

    .venv/bin/python bench/hop_trace.py [--peers 500] [--rates 500,2000] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STEPS = [
    ("commit_to_cycle", "sent", "cycle"),
    ("commit_to_ring", "sent", "woken"),
    ("ring_sent_to_ring", "rung", "woken"),
    ("ring_to_cycle", "woken", "cycle"),
    ("cycle_to_assigned", "cycle", "assigned_at"),
    ("assigned_to_rows", "assigned_at", "assigned"),
    ("assign_statements", "assigned_at", "statements_done"),
    ("assign_commit_and_reply", "statements_done", "assigned"),
    ("rows_to_rendered", "assigned", "rendered"),
    ("rendered_to_read", "rendered", "read"),
    ("read_to_received", "read", "received"),
    ("received_to_offered", "received", "offered"),
    ("offered_to_written", "offered", "written"),
    ("written_to_peer", "written", "arrived"),
    ("assigned_to_peer", "assigned_at", "arrived"),
    ("commit_to_peer", "sent", "arrived"),
]
# Per cycle, since the relay's previous cycle: its loop's worst lateness (a task sleeping 2 ms
# notes how late it wakes) and the time its main thread waited for a CPU (schedstat).
CYCLE_FIGURES = ["relay_loop_lag", "relay_runq_wait"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=500)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--rates", default="500,2000")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--pools", type=int, default=2)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--name", default="hop_trace", help="results file name (bench/results/<name>.json)")
    parser.add_argument(
        "--event-loops",
        default="",
        help="e.g. asyncio,uvloop: a cluster per BACKPLANE_EVENT_LOOP, one after the other (default: as configured)",
    )
    args = parser.parse_args()

    from cluster import BenchCluster

    from harness import data

    rows: list[dict[str, Any]] = []
    loops = [x.strip() for x in args.event_loops.split(",") if x.strip()] or [""]
    with common.hop_trace_dir("hop-trace") as trace_dir:
        for loop in loops:
            if loop:
                os.environ["BACKPLANE_EVENT_LOOP"] = loop
            with BenchCluster("hop", peers=args.peers, tenants=args.tenants, pools=args.pools) as c:
                tenants = data.make_tenants(args.tenants)
                devices = [f"dev-{i}" for i in range(args.peers)]
                pairs, peers_file = c.peer_set(tenants, devices, "main")
                connect = c.pools.connect(pairs)
                print(f"connected {connect['connected']} peers over {len(c.ports)} edges in {connect['secs']:.1f}s")
                for rate in (float(r) for r in args.rates.split(",") if r):
                    for f in trace_dir.glob("*.jsonl"):
                        f.unlink()
                    (trace_dir / "sent.json").unlink(missing_ok=True)
                    argvs = c.producer_argvs(rate, args.seconds, peers_file, args.producers, "device")
                    row, got, rep = c.phase("e2e", rate, "producer_proc.py", argvs, seconds=args.seconds, by_id=True)
                    time.sleep(1.0)  # the processes write their trace lines every 0.5 s
                    rows.append(
                        {"loop": loop or "default", **summarize(rate, row, rep["sent"], got["arrivals"], trace_dir)}
                    )
                    print(f"  {loop} {rate:g}/s: traced {rows[-1]['traced']} of {row['received']} events", flush=True)

    def col(r: dict[str, Any], q: str) -> str:
        return f"{r['loop'] + ' ' if len(loops) > 1 else ''}{r['rate']:g}/s {q}"

    table = [
        {"step": name, **{col(r, q): r["steps"][name][q] for r in rows for q in ("p50", "p99", "tail")}}
        for name in [s[0] for s in STEPS] + CYCLE_FIGURES
    ]
    cols = ["step", *[col(r, q) for r in rows for q in ("p50", "p99", "tail")]]
    common.report(
        f"hop trace — {args.peers} peers on 2 edges, device events, {args.seconds:g}s per rate: "
        "ms per step (median, p99 over events; tail: median over the slowest 1 % of events)",
        table,
        cols,
    )
    common.report(
        "per rate",
        rows,
        [
            "loop",
            "rate",
            "received",
            "traced",
            "p50_ms",
            "p99_ms",
            "decode_us_p50",
            "items_per_publish",
            "assign_ms_with_marks_p50",
            "assign_ms_without_marks_p50",
            "events_without_marks",
        ],
    )
    print(f"wrote {common.write(args.name, rows, {'steps': [s[0] for s in STEPS], 'table': table})}")
    print(common.machine_line())


def summarize(
    rate: float, row: dict[str, Any], sent: dict[str, float], arrivals: dict[str, float], trace_dir: Path
) -> dict[str, Any]:
    from django.db import connections

    from backplane.models import OutboxItem

    relay: dict[tuple[str, int], dict[str, float]] = {}
    edge: dict[tuple[str, int], dict[str, float]] = {}
    batch_sizes: list[int] = []
    if os.environ.get("HOP_TRACE_KEEP"):
        (trace_dir / "sent.json").write_text(json.dumps(sent))
    for path in trace_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["role"] == "bell":
                continue  # every ring the relay's listener took (kept for a look by hand)
            into = relay if rec["role"] == "relay" else edge
            if into is relay:
                batch_sizes.append(len(rec["rows"]))
            for stream, offset in rec["rows"]:
                into[(stream, int(offset))] = rec["t"]
    events = OutboxItem.objects.filter(event_id__in=list(sent)).values_list(
        "event_id", "stream", "stream_offset", "assigned_at"
    )
    per_step: dict[str, list[float]] = {name: [] for name in [s[0] for s in STEPS] + CYCLE_FIGURES}
    per_event: list[dict[str, float]] = []
    decode: list[float] = []
    traced = 0
    for eid, stream, offset, assigned_at in events:
        if eid not in arrivals or assigned_at is None:
            continue
        r, e = relay.get((stream, offset)), edge.get((stream, offset))
        if r is None or e is None:
            continue
        traced += 1
        t = {**r, **e, "sent": sent[eid], "arrived": arrivals[eid], "assigned_at": assigned_at.timestamp()}
        if not t.get("woken") or not t["sent"] <= t["woken"] <= t["cycle"]:
            t.pop("woken", None)  # this cycle did not start on this event's ring
            t.pop("rung", None)
        if not t.get("statements_done"):
            t.pop("statements_done", None)
        if not t.get("rung"):
            t.pop("rung", None)  # a ring without its send time (not traced)
        ms = {name: (t[b] - t[a]) * 1000 for name, a, b in STEPS if a in t and b in t}
        ms["relay_loop_lag"], ms["relay_runq_wait"] = r.get("lag_ms", 0.0), r.get("runq_ms", 0.0)
        ms["marks"] = r.get("marks", 0)
        for name, v in ms.items():
            if name in per_step:
                per_step[name].append(v)
        per_event.append(ms)
        decode.append(e["decode_s"] * 1e6)
    connections.close_all()
    # The slowest 1 % of events (commit → peer): the median of each of their steps.
    cut = common.percentile([e["commit_to_peer"] for e in per_event], 99) if per_event else 0.0
    slow = [e for e in per_event if e["commit_to_peer"] >= cut]
    steps = {
        name: {
            "p50": common.percentile(v, 50),
            "p99": common.percentile(v, 99),
            "tail": common.percentile([e[name] for e in slow if name in e], 50),
            "n": len(v),
        }
        for name, v in per_step.items()
    }
    # The assignment's round trip with and without forwarded marks riding in it (0013).
    with_marks = [e["assigned_to_rows"] for e in per_event if e["marks"] and "assigned_to_rows" in e]
    without = [e["assigned_to_rows"] for e in per_event if not e["marks"] and "assigned_to_rows" in e]
    return {
        "rate": rate,
        "assign_ms_with_marks_p50": common.percentile(with_marks, 50),
        "assign_ms_without_marks_p50": common.percentile(without, 50),
        "events_without_marks": len(without),
        "received": row["received"],
        "traced": traced,
        "p50_ms": row["p50_ms"],
        "p99_ms": row["p99_ms"],
        "decode_us_p50": common.percentile(decode, 50),
        "items_per_publish": sum(batch_sizes) / max(1, len(batch_sizes)),
        "steps": steps,
    }


if __name__ == "__main__":
    main()
