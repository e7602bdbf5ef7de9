"""The fan-out row split: the engine's part of each event's time against the load clients' (issue 17, 2).

Runs the fan-out row of ``e2e_latency.py`` (one tenant, ``--peers`` peers on 2 edges,
tenant-wide events through the outbox at each of ``--rates``) with ``TYRUM_HOP_TRACE`` set, and
joins the relay's and each edge's step times (``backplane/hoptrace.py``) per event and edge
with the producer's commit time:

    commit → rows        the relay cycle's start and its durable assignment
    rows → read          frames built, PUBLISH, Redis → the edge's reader task
    read → received      the edge's queue and loop turn to its delivery loop, decode
    received → offered   the batch handed to each of the edge's sockets (cursor, coalescer)
    offered → written    the end of that loop turn: one send() per socket
    received → written   the two above: the edge's whole burst for the event
    commit → written     the engine done with the event on that edge: every socket written

against commit → peer for every delivery (the row's own figure: the load clients' reads
included). The engine's share of the row is a quantile of ``commit → written`` (one time per
event and edge) over the same quantile of ``commit → peer`` (one per delivery); with the
run-queue waits (schedstat: ms per second runnable but waiting for a core) of the
edges, the relay and the load clients, it says when the load clients, on the same 2 cores,
are what the row waits for.

The run-queue waits are taken over the sending window (sampled every 0.2 s). The traced edge
delivers as the untraced one: batches that piled up behind one are joined (0051), and such a
batch's rows carry its first message's read time.

``--nice-clients N`` renices every thread of the load clients once they are up (they then
yield the cores to the edges): how much of the row is the two sharing the cores.

    .venv/bin/python bench/fanout_trace.py [--peers 1000] [--rates 100] [--seconds 8] [--nice-clients 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# (name, from, to): relay steps by event, edge steps by event and edge.
STEPS = [
    ("commit_to_rows", "sent", "assigned"),
    ("rows_to_read", "assigned", "read"),
    ("read_to_received", "read", "received"),
    ("received_to_offered", "received", "offered"),
    ("offered_to_written", "offered", "written"),
    ("received_to_written", "received", "written"),
    ("commit_to_written", "sent", "written"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rates", default="100")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pools", type=int, default=2)
    parser.add_argument("--nice-clients", type=int, default=0, help="niceness of the load clients (0: as the suite)")
    parser.add_argument("--name", default="fanout_trace", help="results file name (bench/results/<name>.json)")
    args = parser.parse_args()

    from cluster import BenchCluster

    from harness import data

    rows: list[dict[str, Any]] = []
    with (
        common.hop_trace_dir("fanout-trace") as trace_dir,
        BenchCluster("fantrace", peers=args.peers, tenants=1, pools=args.pools) as c,
    ):
        assert c.pools is not None and c.cluster is not None
        fan = data.make_tenants(1, slug="fan")
        pairs, peers_file = c.peer_set(fan, [f"fan-{i}" for i in range(args.peers)], "fan")
        for pid in c.pools.pids if args.nice_clients else ():  # 0: left as started (as in the suite)
            renice(pid, args.nice_clients)
        connect = c.pools.connect(pairs)
        print(f"connected {connect['connected']} peers over {len(c.ports)} edges in {connect['secs']:.1f}s")
        # The CPU meter's own role look-ups (the load clients are its "peers").
        roles = {"edges": c.meter.roles["edges"], "relay": c.meter.roles["relay"], "clients": c.meter.roles["peers"]}
        edge_pids = [p.pid for p in c.cluster.edges]
        for rate in (float(r) for r in args.rates.split(",") if r):
            for f in trace_dir.glob("*.jsonl"):
                f.unlink()
            argvs = c.producer_argvs(rate, args.seconds, peers_file, 1, "tenant")
            with RunqSampler(roles) as runq:
                row, _, rep = c.phase(
                    "fanout", rate, "producer_proc.py", argvs, recipients=connect["connected"], seconds=args.seconds
                )
            time.sleep(1.0)  # the processes write their trace lines every 0.5 s
            out = summarize(row, rep["sent"], trace_dir, edge_pids)
            out.update({f"runq_{k}_ms_per_s": v for k, v in runq.over(rep["start"], rep["end"]).items()})
            out["nice_clients"] = args.nice_clients
            rows.append(out)
            print(
                f"  {rate:g}/s: {row['received']} of {row['expected']} delivered; traced {out['traced']} "
                f"event-edges; commit → peer p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} ms",
                flush=True,
            )

    table = [
        {"step": name, **{f"{r['rate']:g}/s {q}": r["steps"][name][q] for r in rows for q in ("p50", "p99")}}
        for name in [s[0] for s in STEPS]
    ]
    table.append(
        {"step": "commit_to_peer", **{f"{r['rate']:g}/s {q}": r[f"{q}_ms"] for r in rows for q in ("p50", "p99")}}
    )
    common.report(
        f"fan-out trace — {args.peers} peers of one tenant on 2 edges, {args.seconds:g}s per rate, load clients at "
        f"nice {args.nice_clients}: ms per step (per event and edge; commit → peer per delivery)",
        table,
        ["step", *[f"{r['rate']:g}/s {q}" for r in rows for q in ("p50", "p99")]],
    )
    common.report(
        "per rate (run-queue waits: ms per second of the sending window, all threads of the role)",
        rows,
        [
            "rate",
            "received",
            "traced",
            "engine_share_p50",
            "engine_share_p99",
            "runq_edges_ms_per_s",
            "runq_relay_ms_per_s",
            "runq_clients_ms_per_s",
            "cpu_edges",
            "cpu_peers",
            "cpu_machine",
        ],
    )
    print(f"wrote {common.write(args.name, rows, {'args': vars(args), 'table': table})}")
    print(common.machine_line())


def summarize(row: dict[str, Any], sent: dict[str, float], trace_dir: Path, edge_pids: list[int]) -> dict[str, Any]:
    """Per event and edge, each step's time (ms); with the row's commit → peer per delivery."""
    from django.db import connections

    from backplane.models import OutboxItem

    relay, edges = read_traces(trace_dir, edge_pids)
    events = list(OutboxItem.objects.filter(event_id__in=list(sent)).values_list("event_id", "stream", "stream_offset"))
    connections.close_all()
    per_step, traced = join(relay, edges, events, sent)
    steps = {
        name: {"p50": common.percentile(v, 50), "p99": common.percentile(v, 99), "n": len(v)}
        for name, v in per_step.items()
    }
    written = steps["commit_to_written"]
    return {
        "rate": row["rate"],
        "received": row["received"],
        "expected": row["expected"],
        "traced": traced,
        "p50_ms": row["p50_ms"],
        "p99_ms": row["p99_ms"],
        # The engine's part of the row: the quantile of "done writing the event on an edge" (one
        # time per event and edge) over the same quantile of the arrivals (one per delivery).
        "engine_share_p50": written["p50"] / max(1e-9, row["p50_ms"]),
        "engine_share_p99": written["p99"] / max(1e-9, row["p99_ms"]),
        "cpu_edges": row["cpu_edges"],
        "cpu_peers": row["cpu_peers"],
        "cpu_machine": row["cpu"]["machine"],
        "steps": steps,
    }


Trace = dict[tuple[str, int], dict[str, float]]

# How often the run-queue sampler reads the roles' schedstat.
SAMPLE_SECS = 0.2


def renice(pid: int, niceness: int) -> None:
    """Every thread of ``pid`` (Linux's setpriority on a pid reaches only that one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


class RunqSampler:
    """The roles' run-queue totals every SAMPLE_SECS from a thread, so that they can be read
    over the sending window alone: the phase around it also starts the senders (Django's
    imports) and drains."""

    def __init__(self, roles: dict[str, Any]) -> None:
        self.roles = roles
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), {k: common.runq_seconds(get()) for k, get in self.roles.items()}))
            if self.stop.wait(SAMPLE_SECS):
                return

    def __enter__(self) -> RunqSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)

    def over(self, start: float, end: float) -> dict[str, float]:
        """Run-queue wait per role, ms per second, between the samples nearest ``start`` and ``end``."""
        return runq_between(self.samples, start, end)


def runq_between(samples: list[tuple[float, dict[str, float]]], start: float, end: float) -> dict[str, float]:
    if len(samples) < 2:
        return {}
    a = min(samples, key=lambda s: abs(s[0] - start))
    b = min(samples, key=lambda s: abs(s[0] - end))
    wall = max(1e-9, b[0] - a[0])
    return {k: 1000 * (b[1][k] - a[1][k]) / wall for k in a[1]}


def read_traces(trace_dir: Path, edge_pids: list[int]) -> tuple[Trace, list[Trace]]:
    """The relay's step times and each edge's (in ``edge_pids`` order), by (stream, offset).
    A process writes its lines to a file named by whichever of its roles flushed them (the
    relay's doorbell listener too), so a line's own role says what it is, the file its process."""
    relay: Trace = {}
    edges: list[Trace] = [{} for _ in edge_pids]
    for path in trace_dir.glob("*.jsonl"):
        pid = path.stem.rpartition("-")[2]
        edge = edges[edge_pids.index(int(pid))] if pid.isdigit() and int(pid) in edge_pids else None
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            into = relay if rec["role"] == "relay" else edge if rec["role"] == "edge" else None
            if into is None:
                continue  # the relay's doorbell rings, another process's edge lines
            for stream, offset in rec["rows"]:
                into[(stream, int(offset))] = rec["t"]
    return relay, edges


def join(
    relay: Trace, edges: list[Trace], events: list[tuple[str, str, int]], sent: dict[str, float]
) -> tuple[dict[str, list[float]], int]:
    """Each step's times (ms) over every (event, edge) both the relay and that edge traced;
    ``events`` are (event id, stream, offset). Returns them and how many pairs were joined."""
    per_step: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    traced = 0
    for eid, stream, offset in events:
        r = relay.get((stream, offset))
        if r is None or eid not in sent:
            continue
        for edge in edges:
            e = edge.get((stream, offset))
            if e is None:
                continue
            traced += 1
            t = {**r, **e, "sent": sent[eid]}
            for name, a, b in STEPS:
                if t.get(a) and t.get(b):
                    per_step[name].append((t[b] - t[a]) * 1000)
    return per_step, traced


if __name__ == "__main__":
    main()
