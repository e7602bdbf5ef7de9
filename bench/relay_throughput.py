"""Relay throughput: events/s assigned and forwarded by one relay, and by two, over 1000 streams.

For each case a backlog of ``--events`` device events (10 tenants, 1000 device streams) is
appended with ``publish_many`` (1000 per transaction; its rate is reported too) while no relay
runs; then the relay processes (``manage.py run_backplane``; two relays take disjoint shards,
0-7 and 8-15, and the tenants are spread evenly over both halves) start and the database is
polled until every row is forwarded. Before the relays start, ``ANALYZE`` brings the
planner's statistics up to date, as autovacuum would (``--no-analyze`` skips it).

Reported: the span from the first offset assigned to the last row marked forwarded (database
clock), the wall time from spawning the relays to all forwarded (includes their start-up),
and the CPU of the relays, PostgreSQL and Redis. The relays publish to the real Redis pub/sub
layer (no edge subscribed).

    .venv/bin/python bench/relay_throughput.py [--events 50000] [--streams 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from harness import data, procs, scratch  # noqa: E402
from harness.cluster import Cluster  # noqa: E402

DB = scratch.scratch_name("tyrum_bench_relay")
PAD = "x" * 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=1000, help="events per publish_many transaction")
    parser.add_argument("--relays", default="1,2", help="relay counts to measure")
    parser.add_argument("--no-analyze", action="store_true", help="keep the fresh partition's statistics")
    args = parser.parse_args()

    url = common.scratch_database(DB)
    pfx = common.prefix("relay")
    common.setup_django(url, pfx)
    env = common.service_env(url, pfx)
    tenants = data.make_tenants(args.tenants)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    common.LOGS.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(log_dir=common.LOGS, env=env, append_logs=False)
    meter = common.CpuMeter(DB, {"relays": lambda: procs.pids(cluster.relays)})
    try:
        try:
            for batch, count in enumerate(int(x) for x in args.relays.split(",") if x):
                fill_secs = fill(tenants, args, batch)
                if not args.no_analyze:
                    analyze()
                rows.append(
                    {
                        "figure": f"publish_many ({args.chunk}/txn), backlog for {count} relay(s)",
                        "events": args.events,
                        "secs": fill_secs,
                        "events_per_sec": args.events / fill_secs,
                    }
                )
                row = drain(cluster, meter, count, args.events)
                rows.append(row)
                notes += row.pop("notes")
        finally:
            cluster.stop()
    finally:
        scratch.drop_database(DB)
    common.report(
        f"relay throughput — {args.events} events over {args.streams} streams, {args.tenants} tenants "
        f"(CPU in CPU-seconds over the drain)",
        rows,
        [
            "figure",
            "events",
            "secs",
            "events_per_sec",
            "assign_per_sec",
            "spawn_to_done_s",
            "cpu_relays",
            "cpu_postgres",
            "cpu_redis",
            "cpu_other",
        ],
        notes,
    )
    print(common.machine_line())
    print("wrote", common.write("relay_throughput", rows, {"args": vars(args)}))


def analyze() -> None:
    """Statistics as autovacuum keeps them on a table older than a minute (see e2e_latency.py)."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("ANALYZE")


def fill(tenants: list[Any], args: Any, batch: int) -> float:
    from django.db import transaction

    from backplane import outbox

    per_tenant = max(1, args.streams // len(tenants))
    t0 = time.perf_counter()
    made = 0
    for _ in range(args.events // max(1, args.chunk) + 1):  # bounded: one pass per chunk
        if made >= args.events:
            break
        tenant = tenants[(made // args.chunk) % len(tenants)]
        specs = [
            {
                "type": "bench.tick",
                "payload": {"n": made + i, "b": batch, "pad": PAD},
                "device": f"dev-{(made + i) % per_tenant}",
            }
            for i in range(min(args.chunk, args.events - made))
        ]
        with transaction.atomic():
            outbox.publish_many(tenant, specs)
        made += len(specs)
    return time.perf_counter() - t0


def drain(cluster: Cluster, meter: common.CpuMeter, count: int, events: int) -> dict[str, Any]:
    from django.db import connection

    shard_sets = ["0-15"] if count == 1 else [f"{i * 16 // count}-{(i + 1) * 16 // count - 1}" for i in range(count)]
    with connection.cursor() as cur:
        cur.execute("SELECT coalesce(max(id), 0) - %s FROM backplane_outboxitem", [events])
        first_id = cur.fetchone()[0]
    a = meter.snap()
    t0 = time.monotonic()
    relays = [
        cluster.start_relay(f"relay-relay-{count}-{i}", "--shards", shards, wait=False)
        for i, shards in enumerate(shard_sets)
    ]
    left = events
    deadline = t0 + 180
    while time.monotonic() < deadline:
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM backplane_outboxitem WHERE forwarded_at IS NULL")
            left = cur.fetchone()[0]
        if left == 0:
            break
        time.sleep(0.1)
    spawn_to_done = time.monotonic() - t0
    b = meter.snap()
    for relay in relays:
        relay.stop()
    with connection.cursor() as cur:
        cur.execute(
            "SELECT min(assigned_at), max(assigned_at), max(forwarded_at), count(*) FROM backplane_outboxitem "
            "WHERE id > %s AND forwarded_at IS NOT NULL",
            [first_id],
        )
        first_assigned, last_assigned, last_forwarded, done = cur.fetchone()
    span = (last_forwarded - first_assigned).total_seconds() if done else float("nan")
    assign_span = (last_assigned - first_assigned).total_seconds() if done else float("nan")
    cpu = meter.delta(a, b)
    return {
        "figure": f"assign+forward, {count} relay(s) (shards {','.join(shard_sets)})",
        "events": done,
        "secs": span,
        "events_per_sec": done / span if span else float("nan"),
        "assign_per_sec": done / assign_span if assign_span else float("nan"),
        "spawn_to_done_s": spawn_to_done,
        "left": left,
        "cpu": cpu,
        **common.cpu_columns(cpu, ["relays", "postgres", "redis", "other"]),
        "notes": common.notes_for(cpu, [], f"{count} relay(s)"),
    }


if __name__ == "__main__":
    main()
