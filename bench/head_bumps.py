"""The relay's stream-head bumps on the schema before and after migration 0017, alternating.

On a scratch database, two copies of ``backplane_stream``: ``old`` as of migration 0016
(``updated_at`` indexed, default fillfactor: no bump is a HOT update) and ``new`` as of 0017
(the generated ``moved_bucket`` indexed, fillfactor 80). Both get ``--streams`` rows, then
alternating blocks of ``--bumps`` transactions, each bumping ``--per-bump`` random streams with
the upsert of ``bp_assign_v3`` (``updated_at = now()``), in autocommit as the relay does. No
VACUUM in between (autovacuum visits a table at most once a minute, and is off on the CI
server): the dead row versions pile up as they would between its visits. Per block the median
µs per stream bumped; at the end each table's updates, HOT updates, dead rows and sizes.
Why: docs/decisions/0036-hot-stream-heads.md.

    .venv/bin/python bench/head_bumps.py [--streams 20000] [--bumps 200] [--per-bump 250] [--blocks 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import scratch  # noqa: E402

DB = scratch.scratch_name("tyrum_bench_bumps")
BUCKET = "(floor(extract(epoch from (updated_at - timestamptz '1970-01-01 00:00:00+00')) / 10))::bigint"
TABLE = """CREATE TABLE {name} (key varchar(200) PRIMARY KEY, tenant_id uuid NOT NULL, audience varchar(8) NOT NULL,
    epoch varchar(16) NOT NULL, last_offset bigint NOT NULL, first_retained_offset bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT statement_timestamp(){extra}){options};
CREATE INDEX {name}_like ON {name} (key varchar_pattern_ops);
CREATE INDEX {name}_tenant ON {name} (tenant_id, audience);
CREATE INDEX {name}_feed ON {name} ({feed});"""
SHAPES = {
    "old": {"extra": "", "options": "", "feed": "updated_at"},
    "new": {
        "extra": f", moved_bucket bigint GENERATED ALWAYS AS ({BUCKET}) STORED",
        "options": " WITH (fillfactor = 80)",
        "feed": "moved_bucket",
    },
}
BUMP = """INSERT INTO {name} AS s (key, tenant_id, audience, epoch, last_offset, first_retained_offset, updated_at)
SELECT k, '00000000-0000-4000-8000-000000000001', 'device', 'e', 1, 1, now() FROM unnest(%s::text[]) AS k ORDER BY k
ON CONFLICT (key) DO UPDATE SET last_offset = s.last_offset + excluded.last_offset, updated_at = excluded.updated_at"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=20_000)
    parser.add_argument("--bumps", type=int, default=200)
    parser.add_argument("--per-bump", type=int, default=250)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    with psycopg.connect(scratch.PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DB}"')
        admin.execute(f'CREATE DATABASE "{DB}"')
    url = scratch.PG_ADMIN.rsplit("/", 1)[0] + f"/{DB}"
    rng = random.Random(17)
    keys = [f"d:{i:08d}" for i in range(args.streams)]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for name, shape in SHAPES.items():
                conn.execute(TABLE.format(name=name, **shape))
                conn.execute(BUMP.format(name=name), [keys])
                conn.execute(f"VACUUM ANALYZE {name}")
            per_stream: dict[str, list[float]] = {name: [] for name in SHAPES}
            for block in range(args.blocks):
                order = list(SHAPES) if block % 2 == 0 else list(SHAPES)[::-1]
                for name in order:
                    sql = BUMP.format(name=name)
                    times = []
                    for _ in range(args.bumps):
                        batch = rng.sample(keys, args.per_bump)
                        start = time.perf_counter()
                        conn.execute(sql, [batch], prepare=True)
                        times.append((time.perf_counter() - start) * 1e6 / args.per_bump)
                    per_stream[name].append(statistics.median(times))
                print(f"block {block + 1}: " + ", ".join(f"{n} {per_stream[n][-1]:.1f} µs" for n in SHAPES), flush=True)
            conn.execute("SELECT pg_stat_force_next_flush()")
            time.sleep(0.2)
            for name in SHAPES:
                upd, hot, dead, heap, index = conn.execute(
                    "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup, pg_relation_size(relid), pg_indexes_size(relid) "
                    "FROM pg_stat_user_tables WHERE relname = %s",
                    [name],
                ).fetchone()
                print(
                    f"{name}: median of blocks {statistics.median(per_stream[name]):.1f} µs/stream; "
                    f"updates {upd}, HOT {hot} ({100 * hot / max(upd, 1):.1f} %), dead rows {dead}, "
                    f"heap {heap // 1024} KiB, indexes {index // 1024} KiB"
                )
    finally:
        with psycopg.connect(scratch.PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


if __name__ == "__main__":
    main()
