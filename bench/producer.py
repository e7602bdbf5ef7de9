"""Producer cost: publish() inside a one-row state-change transaction vs. the same
transaction without it, and publish_many throughput.

    .venv/bin/python bench/producer.py [--txns 3000] [--many 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--txns", type=int, default=3000)
    parser.add_argument("--many", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    url = common.scratch_database("tyrum_bench_producer")
    common.setup_django(url, "benchprod")
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

    samples: dict[bool, list[float]] = {False: [], True: []}
    for i in range(200):  # warm-up
        txn(i % 2 == 0, i)
    for i in range(args.txns):  # interleaved, so drift hits both alike
        samples[i % 2 == 0].append(txn(i % 2 == 0, i))
    base = sorted(samples[False])
    pub = sorted(samples[True])

    def ms(v: list[float], q: float) -> float:
        return common.percentile(v, q) * 1000

    rows = [
        {"figure": "state txn alone", "p50_ms": ms(base, 50), "p99_ms": ms(base, 99), "mean_ms": sum(base) / len(base) * 1000},
        {"figure": "state txn + publish()", "p50_ms": ms(pub, 50), "p99_ms": ms(pub, 99), "mean_ms": sum(pub) / len(pub) * 1000},
    ]
    overhead = (sum(pub) / len(pub)) / (sum(base) / len(base)) - 1
    specs = [{"type": "bench.tick", "payload": {"n": i, "pad": "x" * 64}, "device": f"dev-{i % 1000}"}
             for i in range(args.many)]
    t0 = time.perf_counter()
    for start in range(0, args.many, args.chunk):
        with transaction.atomic():
            outbox.publish_many(tenant, specs[start : start + args.chunk])
    many_secs = time.perf_counter() - t0
    rows.append({"figure": f"publish_many ({args.chunk}/txn)", "events_per_sec": args.many / many_secs})
    print(f"producer cost — {args.txns} interleaved transactions; publish() overhead {overhead * 100:.1f}% (mean)")
    print(common.table(rows, ["figure", "p50_ms", "p99_ms", "mean_ms", "events_per_sec"]))
    m = common.machine()
    print(f"machine: {m['cpu']} × {m['cores']} cores")
    print("wrote", common.write("producer", rows, {"args": vars(args), "publish_overhead": overhead}))


if __name__ == "__main__":
    main()
