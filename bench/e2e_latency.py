"""End-to-end benchmarks on one cluster: 2 daphne edges, 1 relay, 1000 peers (issue 5, 1–3, 6).

Starts real processes on a scratch PostgreSQL database and Redis (own prefix), connects the
peers (one device each, 10 tenants) from load-client processes, then, in one session and in
this order:

- ``kill``: device events at 1000/s; one edge is SIGKILLed; its peers reconnect to the other
  edge after 0.5–1.5 s (socket.io's default) and resume — events lost; then the edge restarts
  and every peer connects afresh;
- ``e2e``: device-targeted events through the outbox at 500, 2000 and 5000 events/s, commit →
  frame at the peer (p50/p90/p99/max, lost), with the median time commit → assigned → at
  the peer; the search for the maximum sustainable rate adds a rate
  between the first failure and the last pass, or escalates (7500, 10 000, 12 500, … up to
  40 000) while all pass, then tries once between the first failure and the last pass —
  each search bounded by ``--search-secs`` and the session's ``--budget``;
- ``floor``: the raw Channels floor on the same edges and peers — pre-rendered frames
  ``group_send`` straight to the device groups (no outbox, no relay), send → frame, at the
  same rates and the same search;
- ``resume``: a peer that missed 10 000 events reconnects and resumes — time to ``resumed``;
- ``fanout``: 1000 peers of one tenant, tenant-wide events at 100/s (deliveries/s, latency);
  then the ceiling: the rate raised step by step (``--fanout-ceiling``) until one fails (p99 >
  1 s, or fewer than 95 % of the deliveries counted, or any lost), once between the last pass
  and that failure — the highest passing rate, as deliveries/s, with its p50/p99.

"Lost" is what had not arrived 10 s after sending ended (20 s for fan-out; for the kill, up to
60 s, until every failed-over peer has resumed and nothing arrived for 3 s); a rate
that fails is followed by a pause until its backlog has cleared.

Each prints a table and writes ``bench/results/<name>.json`` (e2e_latency, max_rate, resume,
fanout, edge_kill), with the CPU seconds of every process involved per phase.

    .venv/bin/python bench/e2e_latency.py [--peers 1000] [--seconds 6] [--only e2e,floor,...]
    .venv/bin/python bench/e2e_latency.py --only fanout [--fanout-ceiling 200,300,...|0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import load  # noqa: E402
from cluster import BenchCluster  # noqa: E402

from harness import data  # noqa: E402

PHASES = ("e2e", "floor", "resume", "fanout", "kill")
# The device-rate ladder past --rates: up while every rate passes (bounded by --search-secs).
ESCALATE = (7500, 10000, 12500, 15000, 17500, 20000, 25000, 30000, 40000)
# The fan-out ceiling's ladder (tenant-wide events/s to 1000 peers; × 1000 = deliveries/s).
FANOUT_CEILING = (200, 300, 400, 600, 800, 1000, 1500)
COLS = [
    "phase",
    "rate",
    "sent",
    "received",
    "lost",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "recv_rate",
    "ok",
    "cpu_edges",
    "cpu_relay",
    "cpu_peers",
    "cpu_senders",
    "cpu_redis",
    "cpu_postgres",
    "cpu_other",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--rates", default="500,2000,5000")
    parser.add_argument(
        "--escalate",
        default=",".join(str(r) for r in ESCALATE),
        help="rates tried after --rates while all pass (then once between the first failure and the last pass)",
    )
    parser.add_argument(
        "--search-secs", type=float, default=90.0, help="seconds each rate search (e2e, floor) may take"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="sending time per rate")
    parser.add_argument("--pools", type=int, default=2, help="load-client processes")
    parser.add_argument("--producers", type=int, default=2, help="producer (and floor sender) processes")
    parser.add_argument("--fanout-rate", type=float, default=100.0)
    parser.add_argument(
        "--fanout-ceiling",
        default=",".join(str(r) for r in FANOUT_CEILING),
        help="tenant-wide event rates tried after --fanout-rate while all pass ('0': no ceiling search)",
    )
    parser.add_argument("--fanout-ceiling-seconds", type=float, default=4.0, help="sending time per ceiling rate")
    parser.add_argument("--resume-events", type=int, default=10_000)
    parser.add_argument("--resume-runs", type=int, default=3)
    parser.add_argument("--kill-rate", type=float, default=1000.0)
    parser.add_argument("--kill-seconds", type=float, default=8.0)
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases to run, of {','.join(PHASES)}")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds; the rate search stops past it")
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="do not ANALYZE before each phase (measures a fresh outbox partition, as after a rollover)",
    )
    args = parser.parse_args()
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    started = time.monotonic()

    with BenchCluster(
        "e2e", peers=args.peers, tenants=args.tenants, pools=args.pools, analyze=not args.no_analyze
    ) as c:
        tenants = data.make_tenants(args.tenants)
        devices = [f"dev-{i}" for i in range(args.peers)]
        pairs, peers_file = c.peer_set(tenants, devices, "main")
        connect = c.pools.connect(pairs)
        print(
            f"connected {connect['connected']} peers over {len(c.ports)} edges in {connect['secs']:.1f}s "
            f"({connect['retries']} handshakes retried, {connect['failed']} failed {connect['errors'] or ''}) "
            f"from {args.pools} load-client processes ({c.pools.client})"
        )
        searches: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        if "kill" in only:  # first, on a quiet cluster: a failing rate's backlog would spoil it
            run_kill(c, args, peers_file)
            # Back to the starting line: both edges up, every peer connected afresh.
            c.restart_edge(len(c.ports) - 1)
            c.pools.disconnect()
            if not c.wait_outbox_drained(60):
                raise RuntimeError("the relay did not drain the outbox after the kill phase")
            again = c.pools.connect(pairs)
            print(
                f"after the kill: reconnected {again['connected']} peers in {again['secs']:.1f}s "
                f"({again['retries']} handshakes retried, {again['failed']} failed {again['errors'] or ''})"
            )
        if "e2e" in only:
            rows += search(c, args, "e2e", peers_file, started)
            searches["backplane e2e"] = rows[:]
        if "floor" in only:
            if not c.wait_outbox_drained(90):
                raise RuntimeError("the relay did not drain the outbox before the floor phase")
            floor_rows = search(c, args, "floor", peers_file, started)
            rows += floor_rows
            searches["raw Channels floor"] = floor_rows
        if rows:
            report_e2e(args, connect, rows, searches)
        if "resume" in only:
            run_resume(c, args, tenants[0])
        if "fanout" in only:  # last: a backlog it leaves behind would spoil what follows
            c.pools.disconnect()
            fan = data.make_tenants(1, slug="fan")
            fan_pairs, fan_file = c.peer_set(fan, [f"fan-{i}" for i in range(args.peers)], "fan")
            fan_connect = c.pools.connect(fan_pairs)
            run_fanout(c, args, fan_file, fan_connect)
    print(common.machine_line())
    print(f"e2e session ran {time.monotonic() - started:.0f}s")


# --- device-targeted rates: e2e and the raw floor -----------------------------------------------


def search(c: BenchCluster, args: Any, kind: str, peers_file: Path, started: float) -> list[dict[str, Any]]:
    """The device-rate search (``ladder``) for ``kind`` (e2e or floor): --rates, then
    --escalate while all pass; bounded by --search-secs and the session's --budget."""
    targets = floor_targets(c, peers_file) if kind == "floor" else None
    rows: list[dict[str, Any]] = []
    begun = time.monotonic()

    def run(rate: float) -> bool:
        rows.append(run_rate(c, args, kind, rate, peers_file, targets))
        return bool(rows[-1]["ok"])

    def over() -> bool:
        now = time.monotonic()
        return now - started > args.budget or now - begun > args.search_secs

    ladder(run, _rates(args.rates), _rates(args.escalate), over, grain=500)
    return rows


def ladder(
    run: Any, fixed: list[float], escalate: list[float], over: Any, grain: float, passed_before: float | None = None
) -> tuple[float | None, float | None]:
    """Run the ``fixed`` rates in ascending order, trying once between the first failing rate
    and the last passing one right after that failure; past them, ``escalate`` while
    everything passes, then try once between the first failure and the last pass (rounded
    to ``grain``; ``passed_before``: a rate that passed before the ladder, e.g. the fan-out's
    own). ``run(rate)`` says whether the rate passed; no new rate starts once ``over()``.
    Return (highest passing rate, lowest failing rate above it)."""
    passed: list[float] = [] if passed_before is None else [passed_before]
    failed: list[float] = []

    def go(rate: float) -> bool:
        ok = bool(run(rate))
        (passed if ok else failed).append(rate)
        return ok

    def bisect(high: float) -> None:
        below = [r for r in passed if r < high]
        if not below or over():
            return
        mid = round((max(below) + high) / 2 / grain) * grain
        if max(below) < mid < high:
            go(mid)

    bisected = False
    for rate in sorted(fixed):
        if over() and passed:
            break
        if not go(rate) and not bisected:
            bisect(rate)
            bisected = True
    if not failed:
        for rate in sorted(escalate):
            if over():
                break
            if not go(rate):
                bisect(rate)
                break
    best = max(passed) if passed else None
    above = [r for r in failed if best is None or r > best]
    return best, (min(above) if above else None)


def _rates(spec: str) -> list[float]:
    return [float(r) for r in spec.split(",") if r.strip() and float(r) > 0]


def floor_targets(c: BenchCluster, peers_file: Path) -> dict[str, list[Any]]:
    """Device streams of the peers with their epoch and the next offset (after the e2e phase)."""
    from backplane import streams
    from backplane.models import Stream

    keys = [streams.device_stream(uuid.UUID(t), d) for t, d in json.loads(peers_file.read_text())]
    found = {s.key: [s.key, s.epoch, s.last_offset + 1] for s in Stream.objects.filter(key__in=keys)}
    missing = len(keys) - len(found)
    if missing:
        raise RuntimeError(f"{missing} device streams have no head; did the peers connect?")
    return found


def run_rate(
    c: BenchCluster, args: Any, kind: str, rate: float, peers_file: Path, targets: dict[str, list[Any]] | None
) -> dict[str, Any]:
    n = args.producers
    if kind == "e2e":
        argvs = c.producer_argvs(rate, args.seconds, peers_file, n, "device")
        row, got, rep = c.phase("e2e", rate, "producer_proc.py", argvs, seconds=args.seconds, by_id=True)
        row.update(_stages(rep["sent"], got["arrivals"]))
        # PostgreSQL's CPU per event: the relay's lease backend (the assignments) and the rest
        # (the producers' publish, the edges', the relay's other connection, the server's own).
        events = max(1, row["received"])
        row["pg_relay_us"] = row["cpu"].get("postgres_relay", 0.0) / events * 1e6
        row["pg_rest_us"] = row["cpu"].get("postgres_others", 0.0) / events * 1e6
    else:
        assert targets is not None
        keys = sorted(targets)
        files = []
        for i in range(n):  # disjoint streams per sender: each stream's offsets stay contiguous
            path = common.LOGS / f"{c.tag}-floor-targets-{i}.json"
            path.write_text(json.dumps([targets[k] for k in keys[i::n]]))
            files.append(path)
        argvs = [
            [
                "--url",
                c.url,
                "--prefix",
                c.prefix,
                "--rate",
                str(rate / n),
                "--seconds",
                str(args.seconds),
                "--targets",
                str(files[i]),
                "--tag",
                f"{int(rate)}-{i}",
                "--seed",
                str(i),
            ]
            for i in range(n)
        ]
        row, got, rep = c.phase("floor", rate, "floor_proc.py", argvs, seconds=args.seconds, by_id=True)
        for r in rep["reports"]:
            for key, nxt in r["next"].items():
                targets[key][2] = nxt
    print(
        f"  {kind} {rate:g}/s: sent {row['sent']} recv {row['received']} lost {row['lost']} "
        f"p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} max {row['max_ms']:.1f} ms "
        f"recv {row['recv_rate']:.0f}/s {'PASS' if row['ok'] else 'FAIL'}"
        + (f" (lost: {row['lost_targets']} streams)" if row.get("lost_targets") else ""),
        flush=True,
    )
    return row


def _stages(sent: dict[str, float], arrivals: dict[str, float]) -> dict[str, float]:
    """Median time spent commit→assigned (the start of the relay's assignment transaction)
    and assigned→at the peer (the assignment, the send, the edge), ms. (The forwarded mark is
    not on the path: the relay records it with its next assignment.)"""
    from django.db import connections

    from backplane.models import OutboxItem

    rows = OutboxItem.objects.filter(event_id__in=list(sent)).values_list("event_id", "assigned_at")
    a, d, total = [], [], []
    for eid, assigned in rows:
        if assigned is None or eid not in arrivals:
            continue
        a.append((assigned.timestamp() - sent[eid]) * 1000)
        d.append((arrivals[eid] - assigned.timestamp()) * 1000)
        total.append((arrivals[eid] - sent[eid]) * 1000)
    connections.close_all()
    # The same stages for the slowest 1 % of events: where the tail is spent.
    cut = common.percentile(total, 99) if total else 0.0
    slow = [n for n, t in enumerate(total) if t >= cut]
    return {
        "p50_to_assigned_ms": common.percentile(a, 50),
        "p50_assigned_to_peer_ms": common.percentile(d, 50),
        "tail_to_assigned_ms": common.percentile([a[n] for n in slow], 50) if slow else None,
        "tail_assigned_to_peer_ms": common.percentile([d[n] for n in slow], 50) if slow else None,
    }


def max_sustainable(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    passed = [r["rate"] for r in rows if r["ok"]]
    best = max(passed) if passed else None
    fails = [r["rate"] for r in rows if not r["ok"] and (best is None or r["rate"] > best)]
    return best, (min(fails) if fails else None)


def report_e2e(args: Any, connect: dict[str, Any], rows: list[dict[str, Any]], searches: dict[str, Any]) -> None:
    notes = [n for r in rows for n in r["notes"]]
    common.report(
        f"e2e latency — {args.peers} peers on 2 edges, {args.tenants} tenants, device events, "
        f"{args.seconds:g}s per rate; floor = raw Channels group_send → frame on the same edges and peers "
        f"(CPU in CPU-seconds per phase)",
        rows,
        COLS,
        notes,
    )
    e2e = [r for r in rows if r["phase"] == "e2e"]
    if e2e:
        common.report(
            "e2e latency breakdown (ms): medians of all events, and (tail_*) of the slowest 1 %; "
            "PostgreSQL's CPU per event (µs): the relay's lease backend, and the rest",
            e2e,
            [
                "rate",
                "p50_to_assigned_ms",
                "p50_assigned_to_peer_ms",
                "tail_to_assigned_ms",
                "tail_assigned_to_peer_ms",
                "pg_relay_us",
                "pg_rest_us",
            ],
        )
    floor = {r["rate"]: r for r in rows if r["phase"] == "floor"}
    ratios = []
    for r in e2e:
        f = floor.get(r["rate"])
        if f and f["received"]:
            ratios.append(
                {
                    "rate": r["rate"],
                    "p50_e2e/floor": r["p50_ms"] / f["p50_ms"],
                    "p99_e2e/floor": r["p99_ms"] / f["p99_ms"],
                    "cpu_e2e/floor": _our_cpu(r) / max(0.01, _our_cpu(f)),
                }
            )
    if ratios:
        common.report(
            "ratios ours / raw Channels floor (same run; cpu = edges+relay+redis+postgres+senders)",
            ratios,
            ["rate", "p50_e2e/floor", "p99_e2e/floor", "cpu_e2e/floor"],
        )
    max_rows = []
    for system, srows in searches.items():
        best, first_fail = max_sustainable(srows)
        max_rows.append(
            {
                "system": system,
                "max_sustainable": best,
                "first_failing": first_fail,
                "tried": ",".join(f"{r['rate']:g}{'' if r['ok'] else '✗'}" for r in srows),
            }
        )
    common.report(
        "maximum sustainable device rate (0 lost, p99 ≤ 1 s, ≥ 95 % of the rate received)",
        max_rows,
        ["system", "max_sustainable", "first_failing", "tried"],
    )
    print(
        "wrote",
        common.write(
            "e2e_latency", rows, {"args": vars(args), "connect": connect, "ratios": ratios, "client": load_client()}
        ),
    )
    print("wrote", common.write("max_rate", max_rows, {"args": vars(args)}))


def _our_cpu(r: dict[str, Any]) -> float:
    return sum(r[k] for k in ("cpu_edges", "cpu_relay", "cpu_redis", "cpu_postgres", "cpu_senders"))


# --- resume -------------------------------------------------------------------------------------


def run_resume(c: BenchCluster, args: Any, tenant: Any) -> None:
    pairs, _ = c.peer_set([tenant], ["resume-dev"], "resume")
    url, token = pairs[0]
    rows = []
    for i in range(args.resume_runs):
        a = c.meter.snap()
        row = asyncio.run(resume_once(c, url, token, tenant, args.resume_events))
        cpu = c.meter.delta(a, c.meter.snap())
        row.update({"run": i + 1, "cpu": cpu, **common.cpu_columns(cpu, ["edges", "relay", "redis", "postgres"])})
        rows.append(row)
    common.report(
        f"resume — a peer that missed {args.resume_events} device events reconnects (edge 0) and resumes",
        rows,
        [
            "run",
            "missed",
            "replayed",
            "events_before_resumed",
            "connect_to_hello_ms",
            "resume_to_resumed_ms",
            "connect_to_resumed_ms",
            "recovered",
            "cpu_edges",
            "cpu_postgres",
        ],
    )
    print("wrote", common.write("resume", rows, {"args": vars(args)}))


async def resume_once(c: BenchCluster, url: str, token: str, tenant: Any, missed: int) -> dict[str, Any]:
    from django.db import transaction
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    from backplane import outbox, streams
    from backplane.models import Stream

    kw: dict[str, Any] = {
        "subprotocols": [Subprotocol("tyrum-v1")],
        "additional_headers": {"Authorization": f"Bearer {token}"},
        "compression": None,
        "proxy": None,
        "ping_interval": None,
        "max_queue": None,
        "open_timeout": 30,
    }
    async with connect(url, **kw) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        await ws.send('{"type":"ping"}')
    position = hello["streams"]["device"]
    key = streams.device_stream(tenant.id, "resume-dev")

    def publish() -> None:
        with transaction.atomic():
            outbox.publish_many(
                tenant,
                [
                    {"type": "bench.tick", "payload": {"n": i, "pad": "x" * 64}, "device": "resume-dev"}
                    for i in range(missed)
                ],
            )

    def forwarded() -> bool:
        head = Stream.objects.filter(key=key).values_list("last_offset", flat=True).first() or 0
        return head >= position["offset"] + missed and c.unforwarded() == 0

    await asyncio.to_thread(publish)
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(forwarded):
        if time.monotonic() > deadline:
            raise TimeoutError("the relay did not forward the resume backlog in 60 s")
        await asyncio.sleep(0.1)
    t0 = time.perf_counter()
    events = 0
    async with connect(url, **kw) as ws:
        json.loads(await asyncio.wait_for(ws.recv(), 30))
        t_hello = time.perf_counter()
        await ws.send(json.dumps({"type": "resume", "streams": {"device": position}}))
        t_resume = time.perf_counter()
        resumed: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(ws.recv(), 30)
            if raw.startswith('{"type":"event"'):
                events += 1
            elif raw.startswith('{"type":"resumed"'):
                resumed = json.loads(raw)["streams"]["device"]
                break
        t_done = time.perf_counter()
    return {
        "missed": missed,
        "replayed": resumed.get("replayed"),
        "recovered": resumed.get("recovered"),
        "events_before_resumed": events,
        "connect_to_hello_ms": (t_hello - t0) * 1000,
        "resume_to_resumed_ms": (t_done - t_resume) * 1000,
        "connect_to_resumed_ms": (t_done - t0) * 1000,
    }


# --- fan-out and edge kill ------------------------------------------------------------------------


def load_client() -> str:
    return load.client_argv()[2]


FANOUT_COLS = [
    "rate",
    "recipients",
    "sent",
    "expected",
    "received",
    "lost",
    "deliveries_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "ok",
    "cpu_edges",
    "cpu_relay",
    "cpu_peers",
    "cpu_redis",
    "cpu_postgres",
    "cpu_other",
    "edge_us_per_delivery",
    "peers_us_per_delivery",
]


def run_fanout(c: BenchCluster, args: Any, fan_file: Path, connect: dict[str, Any]) -> None:
    """Tenant-wide events to every peer at --fanout-rate; then the ceiling search."""
    recipients = connect["connected"]
    rows = [fanout_rate(c, args, fan_file, recipients, args.fanout_rate, args.seconds, drain_secs=20)]
    ceiling: dict[str, Any] = {}
    steps = [r for r in _rates(args.fanout_ceiling) if r > args.fanout_rate]
    if steps and rows[0]["ok"]:
        ceiling_rows: list[dict[str, Any]] = []

        def run(rate: float) -> bool:
            # A rate whose backlog takes longer than 10 s to arrive has failed on p99 anyway.
            row = fanout_rate(c, args, fan_file, recipients, rate, args.fanout_ceiling_seconds, drain_secs=10)
            ceiling_rows.append(row)
            return bool(row["ok"])

        best, first_fail = ladder(run, [], steps, lambda: False, grain=50, passed_before=args.fanout_rate)
        rows += ceiling_rows
        top = max((r for r in rows if r["ok"]), key=lambda r: r["rate"])
        ceiling = {
            "max_rate": best or args.fanout_rate,
            "first_failing": first_fail,
            "deliveries_per_s": top["deliveries_per_s"],
            "p50_ms": top["p50_ms"],
            "p99_ms": top["p99_ms"],
            "tried": ",".join(f"{r['rate']:g}{'' if r['ok'] else '✗'}" for r in rows),
        }
    notes = [n for r in rows for n in r["notes"]]
    common.report(
        f"fan-out — tenant-wide events to {recipients} peers of one tenant on 2 edges, {args.seconds:g}s "
        f"(ceiling steps {args.fanout_ceiling_seconds:g}s; µs per delivery: CPU of the edges, of the load clients)",
        rows,
        FANOUT_COLS,
        notes,
    )
    if ceiling:
        print(
            f"fan-out ceiling: {ceiling['deliveries_per_s']:.0f} deliveries/s at {ceiling['max_rate']:g} events/s "
            f"(p50 {ceiling['p50_ms']:.1f} ms, p99 {ceiling['p99_ms']:.1f} ms; first failing "
            f"{ceiling['first_failing']}; tried {ceiling['tried']})"
        )
    print(
        "wrote",
        common.write(
            "fanout", rows, {"args": vars(args), "connect": connect, "client": load_client(), "ceiling": ceiling}
        ),
    )


def fanout_rate(
    c: BenchCluster, args: Any, fan_file: Path, recipients: int, rate: float, seconds: float, drain_secs: float
) -> dict[str, Any]:
    argvs = c.producer_argvs(rate, seconds, fan_file, 1, "tenant")
    row, _, _ = c.phase(
        "fanout",
        rate,
        "producer_proc.py",
        argvs,
        recipients=recipients,
        seconds=seconds,
        drain_secs=drain_secs,
    )
    row["recipients"] = recipients
    row["deliveries_per_s"] = row["recv_rate"]
    delivered = max(1, row["received"])
    row["edge_us_per_delivery"] = row["cpu"]["edges"] / delivered * 1e6
    row["peers_us_per_delivery"] = row["cpu"]["peers"] / delivered * 1e6
    # The load clients share the two cores with the edges: say what share of the machine they took.
    busy = max(0.01, row["cpu"]["machine"])
    row["notes"].append(
        f"fanout {rate:g}/s: load clients {row['cpu']['peers'] / busy:.0%} of the machine's busy CPU, "
        f"edges {row['cpu']['edges'] / busy:.0%}"
    )
    print(
        f"  fanout {rate:g}/s: {row['received']} of {row['expected']} delivered, {row['deliveries_per_s']:.0f}/s, "
        f"p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} ms; CPU-s edges {row['cpu_edges']:.2f} "
        f"load clients {row['cpu_peers']:.2f} {'PASS' if row['ok'] else 'FAIL'}",
        flush=True,
    )
    return row


def run_kill(c: BenchCluster, args: Any, peers_file: Path) -> None:
    c.pools.all({"cmd": "failover", "urls": [c.ws_url(0)], "delay": [0.5, 1.5]})
    kill_at = 3.0 if args.kill_seconds >= 6 else args.kill_seconds / 2
    argvs = c.producer_argvs(args.kill_rate, args.kill_seconds, peers_file, args.producers, "device")
    row, got, _ = c.phase(
        "edge SIGKILL",
        args.kill_rate,
        "producer_proc.py",
        argvs,
        seconds=args.kill_seconds,
        kill_edge_at=kill_at,
        drain_secs=60,  # until every failed-over peer has resumed: late is not lost
        flat_secs=3,
        until_resumed=True,
    )
    for o in got["odd"][:10]:
        print(f"  out of order: stream {o[0]} epoch {o[1]} offset {o[2]} arrived after offset {o[3]} (event {o[4]})")
    killed_at = getattr(c, "killed_at", None)
    fo = got["failovers"]
    gaps = sorted((f["resumed_at"] - killed_at) * 1000 for f in fo if killed_at and f["resumed_at"])
    row.update(
        {
            "peers_failed_over": len(fo),
            "peers_resumed": sum(1 for f in fo if f["resumed_at"]),
            "all_recovered": bool(fo)
            and all(f["resumed"] and all(s.get("recovered") for s in f["resumed"].values()) for f in fo),
            "kill_to_resumed_p50_ms": common.percentile(gaps, 50),
            "kill_to_resumed_max_ms": max(gaps) if gaps else float("nan"),
            "lost_pct": 100 * row["lost"] / max(1, row["expected"]),
        }
    )
    common.report(
        f"edge SIGKILL — {args.kill_rate:g} device events/s for {args.kill_seconds:g}s; edge 1 killed at "
        f"{kill_at:g}s; its peers reconnect to edge 0 after 0.5–1.5 s and resume",
        [row],
        [
            "rate",
            "sent",
            "received",
            "lost",
            "lost_pct",
            "dupes",
            "out_of_order",
            "peers_failed_over",
            "peers_resumed",
            "all_recovered",
            "kill_to_resumed_p50_ms",
            "kill_to_resumed_max_ms",
            "p50_ms",
            "p99_ms",
            "max_ms",
        ],
        row["notes"],
    )
    print("wrote", common.write("edge_kill", [row], {"args": vars(args)}))


if __name__ == "__main__":
    main()
