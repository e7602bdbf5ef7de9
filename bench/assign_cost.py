"""What the relay's assignment transaction spends its time on (issue 17, point 3).

On a scratch database, one committed device event at a time, the relay's assignment
(``PostgreSQLStore.aassign``: the call of ``bp_assign_v4`` alone, in autocommit — its own
transaction, which the function makes wait for the WAL flush) against variants, alternating:

    assign            as the relay runs it: one statement, one round trip
    assign, split     the same transaction with a clock reading after the call (the split below)
    assign, async     the same with ``synchronous_commit`` set off after the call: NOT durable,
                      only to show the flush's share (never a candidate: offsets must be
                      durable before sending)
    one-row commit    BEGIN; UPDATE of one stream head; COMMIT with the flush (the floor of any
                      durable transaction on this server)
    one-row, async    the same without the flush
    round trip        SELECT 1 (the client ↔ server floor)
    assign + marks    the same carrying the previous call's rows' forwarded marks, as the relay
                      does at low rates (one UPDATE more in the statement)
    assign, backend CPU  the server process's own CPU time per ``assign`` (``/proc/<pid>/schedstat``;
                      ms, like the rest): PostgreSQL's cost of one assignment with nothing else running
                      (and ``assign + marks, backend CPU``)

Per variant the median and p90 (ms) of the client's wall time, and for the assignment the
server's split: statements (``now()`` → ``clock_timestamp()`` after the call, in its
transaction) and the rest (the commit, its flush and the reply). Table and ``bench/results/assign_cost.json``.

    .venv/bin/python bench/assign_cost.py [--samples 300]
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

DB = scratch.scratch_name("tyrum_bench_assign")


async def measure(samples: int, tenant: Any) -> dict[str, list[float]]:
    from channels.db import database_sync_to_async

    from backplane import outbox
    from backplane.conf import conf
    from backplane.store import get_store
    from backplane.store.postgresql import SQL

    store = get_store()
    session = await store.aopen_session()
    shards = list(range(conf.SHARDS))
    params = [shards, 100, None, [], None]
    variants = (
        "assign",
        "assign, split",
        "assign, async",
        "statements",
        "commit+reply",
        "one-row commit",
        "one-row, async",
        "round trip",
    )
    out: dict[str, list[float]] = {k: [] for k in variants}
    # The backend's own CPU per assignment (its schedstat, ns): what the call costs the server,
    # to set beside the e2e benchmark's pg_relay_us (the same backend's CPU per event under load).
    cur = await session.execute("SELECT pg_backend_pid()")
    (backend,) = await cur.fetchone()
    out["assign, backend CPU"] = []
    out["assign + marks"] = []
    out["assign + marks, backend CPU"] = []
    last: list[Any] = []
    publish = database_sync_to_async(lambda: outbox.publish(tenant, "bench.tick", {"n": 1}, device="dev-0"))

    async def assign(marks: bool = False) -> float:
        # With ``marks``, as the relay at low rates: the previous such call's rows marked
        # forwarded in the same statement (docs/decisions/0013).
        nonlocal last
        await publish()
        cpu = common.oncpu_ns(backend)
        began = time.perf_counter()
        got = await store.aassign(session, shards, 100, forwarded=last if marks else ())
        took = time.perf_counter() - began
        out["assign + marks, backend CPU" if marks else "assign, backend CPU"].append(
            (common.oncpu_ns(backend) - cpu) / 1e6
        )
        assert len(got) == 1, got
        if marks:
            last = got
        return took

    async def assign_split(sync: str) -> tuple[float, float, float]:
        # In autocommit what precedes the sync is one implicit transaction: the call, a setting
        # (bp_assign_v4 sets synchronous_commit on; "off" after it overrides that), the clock.
        await publish()
        began, wall = time.perf_counter(), time.time()
        async with session.pipeline():
            cur = await session.execute(SQL["assign"], params)
            if sync == "off":
                await session.execute("SELECT set_config('synchronous_commit', 'off', true)")
            stamps = await session.execute("SELECT extract(epoch FROM now()), extract(epoch FROM clock_timestamp())")
        took = time.perf_counter() - began
        got = await cur.fetchall()
        start, done = await stamps.fetchone()
        assert len(got) == 1, got
        return took, float(done - start), wall + took - float(done)

    async def one_row(sync: str) -> float:
        began = time.perf_counter()
        async with session.pipeline():
            await session.execute("BEGIN")
            await session.execute(f"SET LOCAL synchronous_commit = {sync}")
            await session.execute("UPDATE backplane_stream SET updated_at = now() WHERE key = %s", [key])
            await session.execute("COMMIT")
        return time.perf_counter() - began

    for _ in range(20):  # warm: plans made, caches filled
        await assign()
        await assign_split("on")
        await assign(marks=True)
    out["assign, backend CPU"].clear()
    out["assign + marks, backend CPU"].clear()
    cur = await session.execute("SELECT key FROM backplane_stream LIMIT 1")
    (key,) = await cur.fetchone()
    for _ in range(samples):
        out["assign"].append(await assign() * 1000)
        out["assign + marks"].append(await assign(marks=True) * 1000)
        took, statements, rest = await assign_split("on")
        out["assign, split"].append(took * 1000)
        out["statements"].append(statements * 1000)
        out["commit+reply"].append(rest * 1000)
        out["assign, async"].append((await assign_split("off"))[0] * 1000)
        out["one-row commit"].append(await one_row("on") * 1000)
        out["one-row, async"].append(await one_row("off") * 1000)
        began = time.perf_counter()
        await session.execute("SELECT 1")
        out["round trip"].append((time.perf_counter() - began) * 1000)
    await store.aclose_session(session)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    url = scratch.scratch_database(DB, common.REDIS_URL)
    try:
        common.setup_django(url, f"benchassign{DB[-6:]}")
        (tenant,) = data.make_tenants(1)
        out = asyncio.run(measure(args.samples, tenant))
    finally:
        scratch.drop_database(DB)
    # A server that is not a process of this machine (a container, another host) has no
    # schedstat here: its CPU rows would read 0, so they are left out.
    for k in [k for k in out if k.endswith("backend CPU") and not any(out[k])]:
        print(f"{k}: not measured (the server's process is not readable here)")
        del out[k]
    rows = [
        {"variant": k, "p50_ms": common.percentile(v, 50), "p90_ms": common.percentile(v, 90), "n": len(v)}
        for k, v in out.items()
    ]
    common.report(
        "the relay's assignment of one committed event, and its floors (client wall time; statements and "
        "commit+reply: the assignment's server-side split)",
        rows,
        ["variant", "p50_ms", "p90_ms", "n"],
    )
    print(f"wrote {common.write('assign_cost', rows, {'samples': args.samples})}")
    print(common.machine_line())


if __name__ == "__main__":
    main()
