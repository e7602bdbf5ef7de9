"""``make cluster``: deploy/compose.yaml's topology as local processes, for a machine without
Docker: two daphne edges, two relays (one takes over from the other) and a compaction loop, on
this machine's PostgreSQL and Redis. Prints the URLs; Ctrl-C stops every process by its PID.

    make cluster CLUSTER_DATABASE_URL=postgres://postgres@127.0.0.1:5432/tyrum_cluster \\
                 CLUSTER_REDIS_URL=redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness package, run as a script

from harness import procs  # noqa: E402
from harness.cluster import Cluster  # noqa: E402
from harness.env import service_env  # noqa: E402

DATABASE_URL = os.environ.get("CLUSTER_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/tyrum_cluster")
REDIS_URL = os.environ.get("CLUSTER_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("CLUSTER_CHANNEL_PREFIX", "tyrumcluster")
COMPACT_EVERY_SECS = float(os.environ.get("COMPACT_EVERY_SECS", "600"))
COMPACT_TIMEOUT_SECS = 300.0


def ensure_database(url: str) -> None:
    """Create the database of ``url`` when the server does not have it yet."""
    import psycopg

    base, name = url.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def compact(env: dict[str, str]) -> None:
    try:
        procs.manage("compact_outbox", env=env, timeout=COMPACT_TIMEOUT_SECS)
    except (RuntimeError, TimeoutError) as exc:  # the next round tries again
        print(f"compaction failed: {type(exc).__name__}", file=sys.stderr)


def main() -> int:
    if not DATABASE_URL.startswith("postgres"):
        print("make cluster needs PostgreSQL (CLUSTER_DATABASE_URL=postgres://…)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (even when started in the background) and SIGTERM
        signal.signal(sig, signal.default_int_handler)
    env = service_env(DATABASE_URL, REDIS_URL, PREFIX, LOG_LEVEL="INFO")
    ensure_database(DATABASE_URL)
    procs.manage("migrate", "--no-input", "-v", "0", env=env, timeout=COMPACT_TIMEOUT_SECS)
    log_dir = Path(tempfile.mkdtemp(prefix="tyrum-cluster-"))
    cluster = Cluster(log_dir=log_dir, env=env)
    try:
        cluster.start_edges(["edge-a", "edge-b"])
        cluster.start_relay("relay-a")
        cluster.start_relay("relay-b", wait=False)  # standby: relay-a holds the shards
        for url, port in zip(cluster.urls, cluster.ports, strict=True):
            print(f"edge  {url}   admin http://127.0.0.1:{port}/admin/   ready http://127.0.0.1:{port}/readyz")
        print(f"relays relay-a, relay-b; compaction every {COMPACT_EVERY_SECS:g}s; logs in {log_dir}")
        print("Ctrl-C stops the cluster.", flush=True)
        while True:
            compact(env)
            deadline = time.monotonic() + COMPACT_EVERY_SECS
            while time.monotonic() < deadline:
                dead = [p.name for p in cluster.procs if not p.alive()]
                if dead:
                    print(f"stopped unexpectedly: {', '.join(dead)} (logs in {log_dir})", file=sys.stderr)
                    return 1
                time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping…", flush=True)
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
