"""Child-process side of the failure matrix: producer code, run with the cluster's environment.

    python tests/faults/agent.py setup SPEC            create tenants and tokens; print JSON
    python tests/faults/agent.py produce SPEC JOURNAL  publish a steady stream until SIGTERM
    python tests/faults/agent.py hold SPEC JOURNAL     publish one event, hold the transaction
    python tests/faults/agent.py burst SPEC JOURNAL    publish many events in one transaction

SPEC is JSON. Each committed event is journalled as one JSON line ``{"id", "t", "lat", ...}``
(``t``: wall-clock time right after COMMIT; ``lat``: seconds from BEGIN to the end of COMMIT),
flushed at once, so the checker knows what committed and when even if this process is killed.
A publish that fails (the database is down) is retried with the same event id: publishing is
idempotent on ``(tenant, event_id)``, so a COMMIT whose outcome was lost cannot double it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, transaction  # noqa: E402

from backplane import publish_many  # noqa: E402

EVENT_TYPE = "fault.tick"
RETRY_SLEEP_SECS = 0.1
ROLES = ("client", "node", "operator")

stopping = False


def _stop(signum: int, frame: Any) -> None:
    global stopping
    stopping = True


def setup(spec: dict[str, Any]) -> dict[str, Any]:
    """Create ``spec["tenants"]`` (slug → list of [device, role]) and one token per peer."""
    from backplane import tokens
    from backplane.models import Tenant

    out: dict[str, Any] = {"tenants": {}, "tokens": []}
    for slug in spec["tenants"]:
        tenant = Tenant.objects.create(slug=slug, name=slug)
        out["tenants"][slug] = str(tenant.id)
    for slug, device, role in spec["peers"]:
        tenant = Tenant.objects.get(slug=slug)
        out["tokens"].append(tokens.create_token(tenant, device, role)[1])
    return out


def audience(rng: random.Random, devices: list[str]) -> dict[str, str]:
    """A tenant-wide, role or device audience (device ids include some with no peer)."""
    pick = rng.random()
    if pick < 0.3:
        return {}
    if pick < 0.6:
        return {"role": rng.choice(ROLES)}
    return {"device": rng.choice(devices)}


def commit(tenant_id: str, events: list[dict[str, Any]], journal: Any, **extra: Any) -> None:
    """Publish ``events`` in one transaction, retrying until it commits (or we are told to stop)."""
    tries = 0
    while True:
        tries += 1
        began = time.time()
        try:
            with transaction.atomic():
                publish_many(tenant_id, events)
            done = time.time()
            break
        except Exception as exc:  # the database is down or restarting: reconnect and retry
            if tries == 1 or tries % 20 == 0:
                print(f"publish failed ({type(exc).__name__}); retrying", file=sys.stderr, flush=True)
            try:
                connection.close()
            except Exception:  # noqa: S110 - the connection is broken; the retry opens a new one
                pass
            if stopping and tries > 50:
                return
            time.sleep(RETRY_SLEEP_SECS)
    for event in events:
        journal.write(json.dumps({"id": event["event_id"], "t": done, "lat": done - began, "tries": tries,
                                  **extra}) + "\n")
    journal.flush()


def event(tenant: str, event_id: str, aud: dict[str, str], **payload: Any) -> dict[str, Any]:
    if "device" in aud:
        target = f"device:{aud['device']}"
    else:
        target = f"role:{aud['role']}" if "role" in aud else "tenant"
    return {"type": EVENT_TYPE, "event_id": event_id, "payload": {"tenant": tenant, "aud": target, **payload}, **aud}


def produce(spec: dict[str, Any], journal: Any) -> None:
    """Publish ``rate`` events a second, one per transaction, round robin over the tenants."""
    rng = random.Random(spec.get("seed", 1))
    tenants = spec["tenants"]  # [[slug, tenant id, [device, ...]], ...]
    interval = 1.0 / float(spec["rate"])
    deadline = time.monotonic() + float(spec.get("duration", 600))
    seq = 0
    next_at = time.monotonic()
    while not stopping and time.monotonic() < deadline:
        slug, tenant_id, devices = tenants[seq % len(tenants)]
        seq += 1
        commit(tenant_id, [event(slug, f"{spec['prefix']}-{seq:06d}", audience(rng, devices), seq=seq)], journal)
        # A steady rate, not a catch-up burst after an outage.
        next_at = max(next_at + interval, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))


def hold(spec: dict[str, Any], journal: Any) -> None:
    """Publish one tenant-wide event and keep its transaction open ``secs`` before COMMIT."""
    slug, tenant_id = spec["tenant"]
    began = time.time()
    with transaction.atomic():
        publish_many(tenant_id, [event(slug, spec["event_id"], {}, held=True)])
        print("inserted", flush=True)
        time.sleep(float(spec["secs"]))
    done = time.time()
    journal.write(json.dumps({"id": spec["event_id"], "t": done, "lat": done - began, "held": True}) + "\n")
    journal.flush()
    print("committed", flush=True)


def burst(spec: dict[str, Any], journal: Any) -> None:
    """Publish ``n`` events of mixed audiences in one transaction."""
    rng = random.Random(spec.get("seed", 2))
    slug, tenant_id, devices = spec["tenant"]
    events = [event(slug, f"{spec['prefix']}-{i:06d}", audience(rng, devices), burst=i) for i in range(spec["n"])]
    print("publishing", flush=True)
    commit(tenant_id, events, journal, burst=True)
    print("committed", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    command, spec = sys.argv[1], json.loads(sys.argv[2])
    if command == "setup":
        print(json.dumps(setup(spec)), flush=True)
        return
    with open(sys.argv[3], "a", buffering=1) as journal:
        {"produce": produce, "hold": hold, "burst": burst}[command](spec, journal)


if __name__ == "__main__":
    main()
