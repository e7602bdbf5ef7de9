"""Relay throughput: events/s assigned and forwarded by one relay over many streams.

Also measures publish_many's append rate (it fills the backlog). Runs the relay in this
process against real PostgreSQL and the real Redis pub/sub layer.

    .venv/bin/python bench/relay_throughput.py [--events 50000] [--streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    url = common.scratch_database("tyrum_bench_relay")
    common.setup_django(url, "benchrelay")
    from channels.layers import get_channel_layer
    from django.db import transaction

    from backplane import outbox
    from backplane.models import Tenant
    from backplane.relay import Relay

    tenants = [Tenant.objects.create(slug=f"t{i}", name=f"T{i}") for i in range(args.tenants)]
    per_tenant = args.streams // args.tenants
    t0 = time.perf_counter()
    chunk = 1000
    made = 0
    while made < args.events:
        tenant = tenants[(made // chunk) % len(tenants)]
        specs = [
            {
                "type": "bench.tick",
                "payload": {"n": made + i, "pad": "x" * 64},
                "device": f"dev-{(made + i) % per_tenant}",
            }
            for i in range(min(chunk, args.events - made))
        ]
        with transaction.atomic():
            outbox.publish_many(tenant, specs)
        made += len(specs)
    publish_secs = time.perf_counter() - t0

    async def drain() -> tuple[float, int]:
        relay = Relay(get_channel_layer(), batch_size=args.batch_size)
        start = time.perf_counter()
        forwarded = 0
        deadline = start + 600
        while forwarded < args.events and time.perf_counter() < deadline:
            _, n = await relay.cycle()
            forwarded += n
        secs = time.perf_counter() - start
        await relay.leases.release()
        return secs, forwarded

    relay_secs, forwarded = asyncio.run(drain())
    rows = [
        {
            "figure": "publish_many (1000/txn)",
            "events": args.events,
            "secs": publish_secs,
            "events_per_sec": args.events / publish_secs,
        },
        {
            "figure": "relay assign+forward, 1 relay",
            "events": forwarded,
            "secs": relay_secs,
            "events_per_sec": forwarded / relay_secs,
        },
    ]
    print(
        f"relay throughput — {args.events} events over {args.streams} streams, {args.tenants} tenants, "
        f"batch {args.batch_size}"
    )
    print(common.table(rows, ["figure", "events", "secs", "events_per_sec"]))
    m = common.machine()
    print(f"machine: {m['cpu']} × {m['cores']} cores")
    print("wrote", common.write("relay_throughput", rows, {"args": vars(args)}))


if __name__ == "__main__":
    main()
