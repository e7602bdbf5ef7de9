"""Producer cost: publish() inside a one-row state-change transaction vs. the same
transaction without it, and publish_many throughput.

The transactions run in blocks of one kind, in shuffled order (drift hits every kind alike;
each transaction follows its own kind). Two floors run with them: the same transaction with
one more statement (``SELECT 1``), and with the smallest possible append (one unindexed
integer row) sent inside the COMMIT's own message — what adding anything to the transaction
costs on this stack before a single byte of an event is validated or stored.

Each arm's CPU per transaction (this process and its PostgreSQL backend) is measured block by
block beside the wall-clock times: it moves less when other work shares the machine.

No relay runs: this is the producer's side alone (this process and PostgreSQL; the doorbell's
Redis PUBLISH is written by the committing thread right after the commit — on its own
connection, without waiting for a reply — so its cost is in the publish() arm, and Redis's
CPU is counted).

    .venv/bin/python bench/producer.py [--txns 1500] [--block 25] [--many 100000] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from harness import scratch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--txns", type=int, default=1500, help="transactions per arm")
    parser.add_argument("--block", type=int, default=25, help="transactions per block of one arm")
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    db = scratch.scratch_name("tyrum_bench_producer")
    url = common.scratch_database(db)
    common.setup_django(url, common.prefix("prod"))
    try:
        rows, overhead = measure(args, db)
    finally:
        scratch.drop_database(db)
    notes = [n for r in rows for n in r.pop("notes", [])]
    common.report(
        f"producer cost — {args.txns} transactions per arm in shuffled blocks of {args.block}; publish() "
        f"overhead {overhead * 100:.1f}% (mean); CPU in CPU-seconds",
        rows,
        ["figure", "p50_ms", "p99_ms", "mean_ms", "overhead_pct", "cpu_python_us", "cpu_backend_us"]
        + ["cpu_overhead_pct", "events_per_sec"]
        + ["cpu_bench", "cpu_postgres", "cpu_redis"],
        notes,
    )
    print(common.machine_line())
    print("wrote", common.write("producer", rows, {"args": vars(args), "publish_overhead": overhead}))


# The arms of the transaction-cost comparison: the state change alone, with publish(), and two
# floors — the least that any way of adding work to the transaction can cost on this stack.
ARMS = {
    "base": "state txn alone",
    "publish": "state txn + publish()",
    "publish_now": "state txn + publish(), PUBLISH_AT_COMMIT off",
    "statement": "floor: + one more statement (SELECT 1)",
    "inline": "floor: + smallest append, inside the COMMIT message",
}


def measure(args: Any, db: str) -> tuple[list[dict[str, Any]], float]:
    import random

    from django.db import connection, transaction

    from backplane import outbox
    from backplane.models import Tenant

    tenant = Tenant.objects.create(slug="t", name="T")
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE bench_state (id int primary key, n bigint)")
        cur.execute("INSERT INTO bench_state VALUES (1, 0)")
        cur.execute("CREATE TABLE bench_append (v int)")  # no index, no key: the cheapest row there is
    connection.ensure_connection()
    raw = connection.connection

    from django.conf import settings

    at_commit = {**(getattr(settings, "BACKPLANE", {}) or {}), "PUBLISH_AT_COMMIT": True}
    now = {**at_commit, "PUBLISH_AT_COMMIT": False}

    def txn(arm: str, i: int) -> float:
        settings.BACKPLANE = now if arm == "publish_now" else at_commit
        t0 = time.perf_counter()
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("UPDATE bench_state SET n = n + 1 WHERE id = 1")
                if arm == "statement":
                    cur.execute("SELECT 1")
            if arm in ("publish", "publish_now"):
                outbox.publish(tenant, "run.updated", {"run_id": i, "status": "running"}, device=f"dev-{i % 100}")
            elif arm == "inline":
                # One simple-protocol message: no round trip, parse or plan beyond the row itself.
                # Django's commit then finds no transaction open and sends nothing.
                raw.execute("INSERT INTO bench_append VALUES (1); COMMIT")
        return time.perf_counter() - t0

    # Blocks of one arm, in shuffled order: a transaction is compared with one that follows its
    # own kind. Alternating arms one by one put the after-effects of each publish() (the
    # doorbell's ring, sent from the producer process after the commit) on the next transaction
    # without it, which read the overhead at half its size.
    rnd = random.Random(5)
    blocks = [arm for arm in ARMS for _ in range(max(1, args.txns // args.block))]
    rnd.shuffle(blocks)
    for i, arm in enumerate(list(ARMS) * 2):  # warm-up
        for j in range(args.block):
            txn(arm, i * args.block + j)
    meter = common.CpuMeter(db, {})
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    # CPU per arm, block by block: this process (process_time) and its PostgreSQL backend
    # (/proc, in clock ticks: summed over many blocks the rounding evens out). Less moved by
    # other work on the machine than wall-clock times.
    backend = raw.info.backend_pid
    cpu_py: dict[str, float] = dict.fromkeys(ARMS, 0.0)
    cpu_pg: dict[str, float] = dict.fromkeys(ARMS, 0.0)
    a = meter.snap()
    for i, arm in enumerate(blocks):
        py0, pg0 = time.process_time(), common.cpu_seconds(backend)
        for j in range(args.block):
            samples[arm].append(txn(arm, i * args.block + j))
        cpu_py[arm] += time.process_time() - py0
        cpu_pg[arm] += common.cpu_seconds(backend) - pg0
    cpu_txn = meter.delta(a, meter.snap())

    def ms(v: list[float], q: float) -> float:
        return common.percentile(sorted(v), q) * 1000

    def mean(arm: str) -> float:
        return sum(samples[arm]) / len(samples[arm])

    rows: list[dict[str, Any]] = []
    for arm, figure in ARMS.items():
        row: dict[str, Any] = {
            "figure": figure,
            "txns": len(samples[arm]),
            "p50_ms": ms(samples[arm], 50),
            "p99_ms": ms(samples[arm], 99),
            "mean_ms": mean(arm) * 1000,
            "overhead_pct": (mean(arm) / mean("base") - 1) * 100,
            "cpu_us_per_txn": (cpu_py[arm] + cpu_pg[arm]) / len(samples[arm]) * 1e6,
            "cpu_python_us": cpu_py[arm] / len(samples[arm]) * 1e6,
            "cpu_backend_us": cpu_pg[arm] / len(samples[arm]) * 1e6,
            "cpu_overhead_pct": ((cpu_py[arm] + cpu_pg[arm]) / (cpu_py["base"] + cpu_pg["base"]) - 1) * 100,
        }
        if arm == "publish":
            row.update(
                **common.cpu_columns(cpu_txn, ["bench", "postgres", "redis"]),
                cpu=cpu_txn,
                notes=common.notes_for(cpu_txn, [], "the transactions of all four arms"),
            )
        rows.append(row)
    overhead = mean("publish") / mean("base") - 1
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
