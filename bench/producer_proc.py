"""A load-generating producer process for the benchmarks (not a benchmark by itself).

Publishes events through the outbox at a fixed rate for a fixed time: every tick (10 ms) it
commits one transaction with the events due by then, and records each event's commit time.
``--audience device`` picks one tenant per tick and a random device of it per event;
``--audience tenant`` publishes tenant-wide events (to every peer of the tenant).
Prints one JSON object {"sent": {event_id: commit_time}, "target": {event_id: device}, "start",
"end", "cpu_s"} at the end.

    python bench/producer_proc.py --url URL --prefix P --rate R --seconds S --peers FILE [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TICK_SECS = 0.01
PAD = "x" * 64  # ~110-byte events, as in the Socket.IO peer benchmark


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--peers", required=True, help="JSON file: [[tenant_id, device], ...]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch seconds: senders start together")
    parser.add_argument("--audience", choices=("device", "tenant"), default="device")
    args = parser.parse_args()
    common.setup_django(args.url, args.prefix)
    from django.db import connections, transaction

    from backplane import doorbell, outbox

    rng = random.Random(args.seed)
    by_tenant: dict[str, list[str]] = {}
    for tenant_id, device in json.loads(Path(args.peers).read_text()):
        by_tenant.setdefault(tenant_id, []).append(device)
    tenants = list(by_tenant)
    sent: dict[str, float] = {}
    target: dict[str, str] = {}  # event id -> device (to tell a lost event's device)
    with transaction.atomic():  # connect and warm up before the clock starts
        pass
    doorbell.connect()  # else the first rings wait tens of ms for the sender thread to connect
    # Our PostgreSQL backend's CPU, reported with ours: it exits with our connection, before
    # the phase's closing snapshot could read it (the meter would count it as another's).
    with connections["default"].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        backend = int(cur.fetchone()[0])
    time.sleep(min(10.0, max(0.0, args.start_at - time.time())))
    # Only a postgres process of this machine (in a container the pid is the container's).
    if not common.is_postgres(backend):
        backend = -1
    backend_cpu0 = common.cpu_seconds(backend)
    cpu0 = time.process_time()
    start_wall = time.time()
    start = time.monotonic()
    stop = start + args.seconds
    n = 0
    for _ in range(int(args.seconds / TICK_SECS) + 10):  # bounded: one pass per tick
        now = time.monotonic()
        if now >= stop:
            break
        due = int((now - start) * args.rate) - n
        if due > 0:
            tenant = tenants[rng.randrange(len(tenants))]
            devices = by_tenant[tenant]
            specs = []
            for i in range(due):
                spec = {"type": "bench.tick", "payload": {"n": n + i, "pad": PAD}}
                if args.audience == "device":
                    spec["device"] = devices[rng.randrange(len(devices))]
                specs.append(spec)
            with transaction.atomic():
                ids = outbox.publish_many(tenant, specs)
            t = time.time()
            for eid, spec in zip(ids, specs, strict=True):
                sent[eid] = t
                target[eid] = spec.get("device", "")
            n += due
        time.sleep(max(0.0, TICK_SECS - (time.monotonic() - now)))
    end_wall = time.time()
    backend_cpu = common.cpu_seconds(backend) - backend_cpu0  # NaN when the server is not on this machine
    connections.close_all()
    report = {
        "sent": sent,
        "target": target,
        "start": start_wall,
        "end": end_wall,
        "cpu_s": time.process_time() - cpu0,
        "startup_cpu_s": cpu0,  # imports and Django's set-up: the harness's, inside the phase's window
    }
    if backend_cpu == backend_cpu:
        report.update(backend_pid=backend, backend_cpu_s=backend_cpu)
    sys.stdout.write(json.dumps(report))


if __name__ == "__main__":
    main()
