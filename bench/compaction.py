"""Compaction at volume (issue 3): time to compact N expired rows, and what compaction costs
the producers meanwhile.

1. Throughput: N forwarded rows past retention, inserted with ``INSERT … SELECT
   generate_series``, compacted by ``retention.compact()``
   - in old time partitions (whole partitions dropped),
   - in the DEFAULT partition (no partition covers their range: batched row deletes),
   - and, apart, expiring N idempotency keys (``EventKey``; row deletes on every path).
   Reported as rows/s, with the outbox's on-disk size before and after (no VACUUM run).
2. Producer latency: a loop of small ``publish()`` transactions, p50/p99, alone and while a
   separate compactor process works through a backlog by each path, and once more by
   partition drops while one producer transaction stays open for a few seconds; the ratio
   is to the baseline of the same run.

3. (``--steady SECS``, a separate run) a steady workload with 5 s partitions and a 10 s
   retention: the outbox's row count and on-disk size after each compaction.

    .venv/bin/python bench/compaction.py [--rows 200000] [--full] [--partitions 10]
    .venv/bin/python bench/compaction.py --steady 60 [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DB_NAME = "tyrum_bench_compaction"
PREFIX = "benchcompact"
DAY = 86400.0
PAD = "x" * 80  # ~100-byte payloads, like small run/status updates


# --- data -----------------------------------------------------------------------------------


def outbox_bytes(cur: Any) -> int:
    cur.execute(
        "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
        "WHERE inhparent = 'backplane_outboxitem'::regclass"
    )
    return int(cur.fetchone()[0])


def insert_expired(tenant: Any, label: str, rows: int, streams_n: int, *, partitions_n: int, days_ago: int) -> int:
    """Insert ``rows`` forwarded rows aged ``days_ago`` days, spread over ``partitions_n`` hourly
    partitions made for them (0: none, so they land in DEFAULT). Return the insert seconds."""
    from django.db import connection

    from backplane import streams
    from backplane.conf import conf

    shard = streams.shard_of(tenant.id, conf.SHARDS)
    key_prefix = streams.device_stream(tenant.id, f"{label}-")
    t0 = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("SELECT date_trunc('hour', now()) - make_interval(days => %s)", [days_ago])
        base = cur.fetchone()[0]
        span_hours = max(partitions_n, 1)
        for k in range(partitions_n):
            cur.execute(
                f'CREATE TABLE "backplane_outboxitem_bench_{label}_{k}" PARTITION OF backplane_outboxitem '
                f"FOR VALUES FROM (%s::timestamptz + make_interval(hours => %s)) "
                f"TO (%s::timestamptz + make_interval(hours => %s))",
                [base, k, base, k + 1],
            )
        cur.execute(
            "INSERT INTO backplane_stream (key, tenant_id, audience, epoch, last_offset, first_retained_offset, "
            "updated_at) SELECT %s || k, %s, 'device', 'bench001', %s, 1, now() FROM generate_series(0, %s - 1) k",
            [key_prefix, tenant.id, rows // streams_n + 1, streams_n],
        )
        cur.execute(
            "INSERT INTO backplane_outboxitem (tenant_id, kind, stream, event_id, type, occurred_at, payload, "
            "payload_bytes, shard, created_at, stream_offset, assigned_at, forwarded_at) "
            "SELECT %s, 'event', %s || (i %% %s), %s || i, 'bench.tick', ts, jsonb_build_object('n', i, 'pad', %s), "
            "%s, %s, ts, i / %s + 1, ts, ts FROM generate_series(0, %s - 1) AS i, "
            "LATERAL (SELECT %s::timestamptz + make_interval(secs => i * %s::float8 / %s) AS ts) t",
            [
                tenant.id,
                key_prefix,
                streams_n,
                f"{label}-",
                PAD,
                len(PAD) + 24,
                shard,
                streams_n,
                rows,
                base,
                span_hours * 3600 - 1,
                rows,
            ],
        )
        cur.execute("ANALYZE backplane_outboxitem")
    return time.perf_counter() - t0


def insert_expired_keys(tenant: Any, rows: int) -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO backplane_eventkey (tenant_id, event_id, created_at) "
            "SELECT %s, 'key-' || i, now() - interval '30 days' FROM generate_series(0, %s - 1) i",
            [tenant.id, rows],
        )
        cur.execute("ANALYZE backplane_eventkey")


# --- (1) throughput -----------------------------------------------------------------------


def throughput(tenant: Any, rows: int, partitions_n: int, streams_n: int) -> list[dict[str, Any]]:
    from django.db import connection

    from backplane import retention

    out: list[dict[str, Any]] = []
    for path, parts, days in (("partition drop", partitions_n, 30), ("row delete (DEFAULT)", 0, 60)):
        label = "p" if parts else "d"
        insert_secs = insert_expired(tenant, label, rows, streams_n, partitions_n=parts, days_ago=days)
        with connection.cursor() as cur:
            before = outbox_bytes(cur)
        t0 = time.perf_counter()
        result = retention.compact(DAY, max_batches=1_000_000)
        secs = time.perf_counter() - t0
        with connection.cursor() as cur:
            after = outbox_bytes(cur)
        assert result.deleted == rows and not result.capped, result.summary()
        out.append(
            {
                "path": path,
                "rows": rows,
                "insert_s": insert_secs,
                "compact_s": secs,
                "rows_per_s": rows / secs,
                "partitions": result.partitions_dropped,
                "batches": result.batches,
                "mb_before": before / 2**20,
                "mb_after": after / 2**20,
            }
        )
    insert_expired_keys(tenant, rows)
    t0 = time.perf_counter()
    result = retention.compact(DAY, max_batches=1_000_000)
    secs = time.perf_counter() - t0
    assert result.keys_expired == rows, result
    out.append({"path": "event keys expired", "rows": rows, "compact_s": secs, "rows_per_s": rows / secs})
    return out


# --- (2) producer latency -----------------------------------------------------------------


def publish_loop(tenant: Any, keep_going: Any, min_secs: float = 0.0) -> list[float]:
    """Publish one ~100-byte event per transaction while ``keep_going()``; return ms each."""
    from django.db import transaction

    from backplane import outbox

    latencies: list[float] = []
    started = time.perf_counter()
    n = 0
    while keep_going() or time.perf_counter() - started < min_secs:
        t0 = time.perf_counter()
        with transaction.atomic():
            outbox.publish(tenant, "bench.append", {"n": n, "pad": PAD}, device=f"dev-{n % 50}")
        latencies.append((time.perf_counter() - t0) * 1000)
        n += 1
    return latencies


# A producer transaction that stays open this long (publish() runs inside the caller's
# transaction, so a slow request holds a lock on the outbox until it commits).
HOLD_SECS = 3.0


def hold_transaction(url: str, secs: float) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("SELECT count(*) FROM backplane_outboxitem WHERE false")
        time.sleep(secs)
        conn.commit()


def summarise(phase: str, lat: list[float], base: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    row = {
        "phase": phase,
        "publishes": len(lat),
        "p50_ms": common.percentile(lat, 50),
        "p99_ms": common.percentile(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        **extra,
    }
    if base:
        row["p50_ratio"] = row["p50_ms"] / base["p50_ms"]
        row["p99_ratio"] = row["p99_ms"] / base["p99_ms"]
    return row


def latency(tenant: Any, url: str, backlog: int, partitions_n: int, baseline_secs: float) -> list[dict[str, Any]]:
    base = summarise("no compaction", publish_loop(tenant, lambda: False, baseline_secs), None)
    rows = [base]
    phases = (
        ("during partition drop", "lp", partitions_n, 40, 0.0),
        ("during row delete", "ld", 0, 50, 0.0),
        (f"partition drop, a {HOLD_SECS:.0f}s txn open", "lh", partitions_n, 45, HOLD_SECS),
    )
    for path, label, parts, days, hold in phases:
        insert_expired(tenant, label, backlog, 100, partitions_n=parts, days_ago=days)
        holder = threading.Thread(target=hold_transaction, args=(url, hold)) if hold else None
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", url],
            cwd=common.ROOT,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        if holder:
            holder.start()
            time.sleep(0.2)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        lat = publish_loop(tenant, lambda: proc.poll() is None)
        if holder:
            holder.join(timeout=30)
        report = json.loads(proc.stdout.read().strip().splitlines()[-1])
        proc.wait(timeout=60)
        assert report["deleted"] == backlog, report
        rows.append(summarise(path, lat, base, compact_s=report["secs"], backlog=backlog))
    rows.append(summarise("no compaction, again", publish_loop(tenant, lambda: False, baseline_secs), base))
    return rows


def worker(url: str) -> None:
    """Compactor process for (2): wait for "go", compact once, print the figures."""
    common.setup_django(url, PREFIX)
    from backplane import retention

    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    result = retention.compact(DAY, max_batches=1_000_000)
    print(
        json.dumps(
            {"secs": time.perf_counter() - t0, "deleted": result.deleted, "partitions": result.partitions_dropped}
        ),
        flush=True,
    )


# --- (3) steady state -----------------------------------------------------------------------


def steady(secs: float, rate: float) -> list[dict[str, Any]]:
    """Publish at ``rate``/s for ``secs`` with 5 s partitions and a 10 s retention; forward
    (outbox steps of the relay, no transport) every 0.2 s and compact every 2 s; sample the
    outbox's rows and size after each compaction."""
    from django.db import connection, connections, transaction

    from backplane import outbox, retention
    from backplane.conf import conf
    from backplane.models import Tenant
    from backplane.store import get_store

    tenant = Tenant.objects.create(slug="steady", name="Steady")
    stop = threading.Event()
    shards = list(range(conf.SHARDS))
    errors: list[str] = []

    def produce() -> None:
        n = 0
        started = time.perf_counter()
        while not stop.is_set():
            with transaction.atomic():
                outbox.publish_many(
                    tenant,
                    [
                        {"type": "bench.steady", "payload": {"n": n + i, "pad": PAD}, "device": f"dev-{(n + i) % 50}"}
                        for i in range(10)
                    ],
                )
            n += 10
            stop.wait(max(0.0, started + n / rate - time.perf_counter()))
        connections.close_all()

    def forward() -> None:
        while not stop.is_set():
            try:
                store = get_store()
                store.assign(shards, 5000)
                store.mark_forwarded([p.id for p in store.unforwarded(shards, 5000)])
            except Exception as exc:  # as the relay does: count, back off, go on
                errors.append(f"forward: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            stop.wait(0.2)
        connections.close_all()

    threads = [threading.Thread(target=produce), threading.Thread(target=forward)]
    for t in threads:
        t.start()
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < secs:
            time.sleep(2.0)
            result = retention.compact()
            with connection.cursor() as cur:
                cur.execute(
                    "SELECT count(*), count(*) FILTER (WHERE tableoid = 'backplane_outboxitem_default'"
                    "::regclass) FROM backplane_outboxitem"
                )
                rows, in_default = cur.fetchone()
                cur.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'backplane_outboxitem'::regclass")
                parts = cur.fetchone()[0]
                size = outbox_bytes(cur)
                cur.execute("SELECT pg_total_relation_size('backplane_eventkey')")
                keys_size = cur.fetchone()[0]
            samples.append(
                {
                    "t": round(time.perf_counter() - started, 1),
                    "rows": rows,
                    "in_default": in_default,
                    "outbox_mb": size / 2**20,
                    "partitions": parts,
                    "dropped": result.partitions_dropped,
                    "deleted": result.deleted,
                    "keys_expired": result.keys_expired,
                    "eventkey_mb": keys_size / 2**20,
                }
            )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    for error in errors:
        print(error)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="expired rows per path for (1)")
    parser.add_argument("--full", action="store_true", help="1,000,000 rows per path (issue 3's figure)")
    parser.add_argument("--partitions", type=int, default=10, help="old hourly partitions the rows are spread over")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--backlog", type=int, default=None, help="rows compacted during (2) (default: rows/2)")
    parser.add_argument("--baseline-secs", type=float, default=5.0)
    parser.add_argument(
        "--steady",
        type=float,
        default=0.0,
        metavar="SECS",
        help="instead: run a steady workload this long (5 s partitions, 10 s retention)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="events/s for --steady")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.steady:
        # Before migrate and Django setup: settings read these from the environment.
        os.environ.update({"BACKPLANE_PARTITION_INTERVAL_SECS": "5", "BACKPLANE_RETENTION_SECS": "10"})
        common.setup_django(common.scratch_database(DB_NAME + "_steady"), PREFIX)
        samples = steady(args.steady, args.rate)
        print(
            f"\nsteady state — {args.rate:.0f} events/s for {args.steady:.0f}s, 5 s partitions, 10 s retention, "
            f"compaction every 2 s"
        )
        print(
            common.table(
                samples,
                [
                    "t",
                    "rows",
                    "in_default",
                    "outbox_mb",
                    "partitions",
                    "dropped",
                    "deleted",
                    "keys_expired",
                    "eventkey_mb",
                ],
            )
        )
        print("wrote", common.write("compaction_steady", samples, {"args": vars(args), "loadavg": os.getloadavg()}))
        return
    if args.full:
        args.rows = 1_000_000
    backlog = args.backlog or args.rows // 2

    url = common.scratch_database(DB_NAME)
    common.setup_django(url, PREFIX)
    from backplane.models import Tenant

    tenant = Tenant.objects.create(slug="bench", name="Bench")
    started = time.perf_counter()
    rows1 = throughput(tenant, args.rows, args.partitions, args.streams)
    rows2 = latency(tenant, url, backlog, args.partitions, args.baseline_secs)
    m = common.machine()
    load = os.getloadavg()

    print(
        f"\ncompaction — {args.rows} expired rows per path, {args.partitions} old partitions, "
        f"{args.streams} streams, batch 5000"
    )
    print(
        common.table(
            rows1,
            ["path", "rows", "insert_s", "compact_s", "rows_per_s", "partitions", "batches", "mb_before", "mb_after"],
        )
    )
    print(f"\nproducer append latency (1 publish per transaction), backlog {backlog} rows per compaction")
    print(
        common.table(rows2, ["phase", "publishes", "p50_ms", "p99_ms", "max_ms", "p50_ratio", "p99_ratio", "compact_s"])
    )
    print(
        f"\nmachine: {m['cpu']} × {m['cores']} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"PostgreSQL on the same host; ran {time.perf_counter() - started:.0f}s"
    )
    extra = {"args": vars(args), "latency": rows2, "loadavg": load}
    print("wrote", common.write("compaction_full" if args.full else "compaction", rows1, extra))


if __name__ == "__main__":
    main()
