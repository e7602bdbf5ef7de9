"""Producer cost: publish() inside a one-row state-change transaction vs. the same
transaction without it (interleaved, so drift hits both alike), and publish_many throughput.

No relay runs: this is the producer's side alone (this process and PostgreSQL; the doorbell's
Redis PUBLISH happens on a background thread after commit, and Redis's CPU is counted).

    .venv/bin/python bench/producer.py [--txns 3000] [--many 100000] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--txns", type=int, default=3000)
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    db = common.scratch_name("tyrum_bench_producer")
    url = common.scratch_database(db)
    common.setup_django(url, common.prefix("prod"))
    try:
        rows, overhead = measure(args, db)
    finally:
        common.drop_database(db)
    notes = [n for r in rows for n in r.pop("notes", [])]
    common.report(
        f"producer cost — {args.txns} interleaved transactions; publish() overhead {overhead * 100:.1f}% (mean); "
        f"CPU in CPU-seconds",
        rows,
        ["figure", "p50_ms", "p99_ms", "mean_ms", "events_per_sec", "cpu_bench", "cpu_postgres", "cpu_redis"],
        notes,
    )
    print(common.machine_line())
    print("wrote", common.write("producer", rows, {"args": vars(args), "publish_overhead": overhead}))


def measure(args: Any, db: str) -> tuple[list[dict[str, Any]], float]:
    from django.db import connection, transaction

    from backplane import outbox
    from backplane.models import Tenant

    tenant = Tenant.objects.create(slug="t", name="T")
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE bench_state (id int primary key, n bigint)")
        cur.execute("INSERT INTO bench_state VALUES (1, 0)")

    def txn(with_publish: bool, i: int) -> float:
        t0 = time.perf_counter()
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("UPDATE bench_state SET n = n + 1 WHERE id = 1")
            if with_publish:
                outbox.publish(tenant, "run.updated", {"run_id": i, "status": "running"}, device=f"dev-{i % 100}")
        return time.perf_counter() - t0

    meter = common.CpuMeter(db, {})
    samples: dict[bool, list[float]] = {False: [], True: []}
    for i in range(200):  # warm-up
        txn(i % 2 == 0, i)
    a = meter.snap()
    for i in range(args.txns):
        samples[i % 2 == 0].append(txn(i % 2 == 0, i))
    cpu_txn = meter.delta(a, meter.snap())
    base = sorted(samples[False])
    pub = sorted(samples[True])

    def ms(v: list[float], q: float) -> float:
        return common.percentile(v, q) * 1000

    rows: list[dict[str, Any]] = [
        {
            "figure": "state txn alone",
            "p50_ms": ms(base, 50),
            "p99_ms": ms(base, 99),
            "mean_ms": sum(base) / len(base) * 1000,
        },
        {
            "figure": "state txn + publish()",
            "p50_ms": ms(pub, 50),
            "p99_ms": ms(pub, 99),
            "mean_ms": sum(pub) / len(pub) * 1000,
            **common.cpu_columns(cpu_txn, ["bench", "postgres", "redis"]),
            "cpu": cpu_txn,
            "notes": common.notes_for(cpu_txn, [], "interleaved transactions"),
        },
    ]
    overhead = (sum(pub) / len(pub)) / (sum(base) / len(base)) - 1
    specs = [
        {"type": "bench.tick", "payload": {"n": i, "pad": "x" * 64}, "device": f"dev-{i % 1000}"}
        for i in range(args.many)
    ]
    a = meter.snap()
    t0 = time.perf_counter()
    for start in range(0, args.many, args.chunk):
        with transaction.atomic():
            outbox.publish_many(tenant, specs[start : start + args.chunk])
    many_secs = time.perf_counter() - t0
    cpu_many = meter.delta(a, meter.snap())
    rows.append(
        {
            "figure": f"publish_many ({args.chunk}/txn)",
            "events_per_sec": args.many / many_secs,
            **common.cpu_columns(cpu_many, ["bench", "postgres", "redis"]),
            "cpu": cpu_many,
            "notes": common.notes_for(cpu_many, [], "publish_many"),
        }
    )
    return rows, overhead


if __name__ == "__main__":
    main()
