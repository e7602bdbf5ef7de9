"""The relay's claim with assigned rows behind it, with and without its floor (0048).

An assigned row's entry stays in the claim's partial index until a VACUUM removes it; a claim
from the lowest id walks past all of them. On a scratch database: ``--backlog`` events
published (``publish_many``) and assigned by the relay's ``aassign`` in batches, no vacuum
(as between two autovacuum visits); then, alternating, one committed event at a time claimed
by ``aassign`` from the lowest id (the floor at 0, as before 0048) and above the claim floor
(``backplane.claims.ClaimFloor``, as the relay runs it). Per variant: the client's wall time
(p50, p90, ms) and the relay backend's CPU per call (µs, from ``/proc/<pid>/schedstat``).
Table and ``bench/results/claim_floor.json``.

    .venv/bin/python bench/claim_floor.py [--backlog 300000] [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from harness import data, scratch  # noqa: E402

DB = scratch.scratch_name("tyrum_bench_claim")


def backend_cpu_ns(pid: int) -> int:
    """A PostgreSQL backend's CPU time in ns (same machine: the benchmark's own server)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def measure(backlog: int, samples: int, tenant: Any) -> dict[str, list[float]]:
    from channels.db import database_sync_to_async

    from backplane import outbox
    from backplane.claims import READING_SECS, ClaimFloor
    from backplane.conf import conf
    from backplane.store import get_store

    store = get_store()
    session = await store.aopen_session()
    cur = await session.execute("SELECT pg_backend_pid()")
    (pid,) = await cur.fetchone()
    shards = list(range(conf.SHARDS))
    chunk = 5000
    for start in range(0, backlog, chunk):
        events = [{"type": "bench.fill", "payload": {"n": start + i}} for i in range(min(chunk, backlog - start))]
        await database_sync_to_async(outbox.publish_many)(tenant, events)
        while await store.aassign(session, shards, 1000):
            pass
    publish = database_sync_to_async(lambda: outbox.publish(tenant, "bench.tick", {"n": 1}, device="dev-0"))
    floor = ClaimFloor(full_scan_secs=float("inf"), reading_secs=0.0)  # warm-up: readings every call

    async def claim(with_floor: bool) -> tuple[float, float]:
        await publish()
        cpu = backend_cpu_ns(pid)
        began = time.perf_counter()
        got = await store.aassign(session, shards, 100, floor=floor if with_floor else None)
        took = time.perf_counter() - began
        assert len(got) == 1, got
        return took * 1000, (backend_cpu_ns(pid) - cpu) / 1000

    for _ in range(10):  # warm: plans made, the floor raised
        await claim(True)
        await claim(False)
    floor.reading_secs = READING_SECS  # measured: as the relay runs it
    out: dict[str, list[float]] = {k: [] for k in ("from the lowest id", "above the floor")}
    cpu: dict[str, list[float]] = {k: [] for k in out}
    for _ in range(samples):
        for name, with_floor in (("from the lowest id", False), ("above the floor", True)):
            took, used = await claim(with_floor)
            out[name].append(took)
            cpu[name].append(used)
    await store.aclose_session(session)
    return {**out, **{f"{k} (backend µs)": v for k, v in cpu.items()}, "floor": [float(floor.after)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=300_000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    url = scratch.scratch_database(DB, common.REDIS_URL)
    try:
        common.setup_django(url, f"benchclaim{DB[-6:]}")
        (tenant,) = data.make_tenants(1)
        out = asyncio.run(measure(args.backlog, args.samples, tenant))
    finally:
        scratch.drop_database(DB)
    floor = out.pop("floor")[0]
    rows = []
    for name in ("from the lowest id", "above the floor"):
        wall, used = out[name], out[f"{name} (backend µs)"]
        rows.append(
            {
                "claim": name,
                "wall_p50_ms": common.percentile(wall, 50),
                "wall_p90_ms": common.percentile(wall, 90),
                "backend_us_p50": common.percentile(used, 50),
                "n": len(wall),
            }
        )
    common.report(
        f"the relay's claim of one committed event with {args.backlog} assigned rows behind it, no vacuum "
        f"(the floor ended at id {floor:.0f})",
        rows,
        ["claim", "wall_p50_ms", "wall_p90_ms", "backend_us_p50", "n"],
    )
    print(f"wrote {common.write('claim_floor', rows, {'backlog': args.backlog, 'samples': args.samples})}")
    print(common.machine_line())


if __name__ == "__main__":
    main()
