"""Doorbell choice: commit → relay wake-up latency and the producer's cost per ring.

Compares the two low-latency signals DESIGN.md allows, measured the same way in one run:
- Redis PUBLISH after commit with redis-py, waiting for its reply, listener on redis.asyncio pub/sub;
- PostgreSQL NOTIFY in a small post-commit transaction, listener on psycopg LISTEN;
- ``backplane.doorbell.ring()`` itself, as producers call it: the PUBLISH written from the
  committing thread without waiting for the reply (``ring``), and by the sender thread it
  falls back to (``ring via thread``); the caller's cost is its own time in ``ring()``, and
  the thread's work, which competes with the caller, is not in it;
and the polling fallback (expected wake = half the poll interval, computed not measured).

    .venv/bin/python bench/doorbell.py [--rings 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from harness import scratch  # noqa: E402

PG = scratch.PG_ADMIN.rsplit("/", 1)[0] + "/postgres"


def measure(kind: str, rings: int) -> dict[str, float]:
    import psycopg
    import redis
    import redis.asyncio as aredis

    channel = f"bench_doorbell_{kind}"
    if kind.startswith("ring"):
        from backplane import doorbell

        channel = doorbell.channel_name()
    woke: list[float] = []
    sent: list[float] = []
    ready = threading.Event()
    done = threading.Event()

    async def listen() -> None:
        if kind != "notify":
            client = aredis.Redis.from_url(common.REDIS_URL)
            async with client.pubsub() as ps:
                await ps.subscribe(channel)
                ready.set()
                while len(woke) < rings and not done.is_set():
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg:
                        woke.append(time.perf_counter())
            await client.aclose()
        else:
            conn = await psycopg.AsyncConnection.connect(PG, autocommit=True)
            await conn.execute(f"LISTEN {channel}")
            ready.set()
            gen = conn.notifies(timeout=1.0)
            async for _ in gen:
                woke.append(time.perf_counter())
                if len(woke) >= rings or done.is_set():
                    break
            await conn.close()

    thread = threading.Thread(target=lambda: asyncio.run(listen()))
    thread.start()
    ready.wait(10)
    r = redis.Redis.from_url(common.REDIS_URL)
    with psycopg.connect(PG) as producer, psycopg.connect(PG, autocommit=True) as notifier:
        producer.execute("CREATE TEMP TABLE t (id bigserial primary key, v text)")
        producer.commit()
        ring_cost = 0.0
        for _ in range(rings):
            producer.execute("INSERT INTO t (v) VALUES ('x')")
            producer.commit()
            t0 = time.perf_counter()
            sent.append(t0)
            if kind == "redis":
                r.publish(channel, "1")
            elif kind.startswith("ring"):
                doorbell.ring(1)
            else:
                notifier.execute(f"NOTIFY {channel}, '1'")
            ring_cost += time.perf_counter() - t0
            deadline = time.perf_counter() + 1.0
            while len(woke) < len(sent) and time.perf_counter() < deadline:
                time.sleep(0.0001)
    done.set()
    thread.join(10)
    lat = [(w - s) * 1000 for s, w in zip(sent, woke, strict=False)]
    return {
        "p50_ms": common.percentile(lat, 50),
        "p99_ms": common.percentile(lat, 99),
        "ring_cost_us": ring_cost / rings * 1e6,
        "rings": len(lat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rings", type=int, default=2000)
    args = parser.parse_args()
    common.setup_django(PG, common.prefix("bell"))
    from backplane import doorbell

    rows = []
    for kind in ("redis", "notify"):
        rows.append({"doorbell": f"{kind} after commit", **measure(kind, args.rings)})
    doorbell.ring(1)  # the first ring goes by the sender thread, which then opens the direct connection
    deadline = time.monotonic() + 5
    while doorbell._wire is None and time.monotonic() < deadline:
        time.sleep(0.01)
    rows.append({"doorbell": "backplane ring(), after commit", **measure("ring", args.rings)})
    # ...and the sender thread's way (what ring() does when it cannot write at once), kept so.
    doorbell._Wire.connect = lambda: None  # type: ignore[method-assign]
    doorbell._wire = None
    rows.append({"doorbell": "backplane ring() via thread", **measure("ring-thread", args.rings)})
    rows.append(
        {"doorbell": "poll every 250 ms (embedded)", "p50_ms": 125.0, "p99_ms": 247.5, "ring_cost_us": 0.0, "rings": 0}
    )
    print("doorbell — commit → listener wake-up (one ring at a time)")
    print(common.table(rows, ["doorbell", "rings", "p50_ms", "p99_ms", "ring_cost_us"]))
    m = common.machine()
    print(f"machine: {m['cpu']} × {m['cores']} cores; poll row is arithmetic, not measured")
    print("wrote", common.write("doorbell", rows, {"args": vars(args)}))


if __name__ == "__main__":
    main()
