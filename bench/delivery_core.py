"""The edge's fast path through the delivery core: what ``Delivery.offer`` costs per socket
per relay batch, against the loop the consumer ran inline before the core existed (kept here,
below, as the reference), in one run. The edge hands every batch to each socket of its stream
through this call, so in a fan-out it runs once per socket per batch.

    .venv/bin/python bench/delivery_core.py [--sockets 1000] [--batches 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")
import common  # noqa: E402

from backplane.delivery import Cursor, Delivery, TokenBucket  # noqa: E402


class Head:
    epoch, offset, first_retained = "e0", 0, 1


def inline_offer(cursor: Cursor, offsets: list[int]) -> list[int]:
    """The consumer's fast path before the delivery core (the reference): skip repeats, send
    while the offsets continue the cursor, stop at a gap."""
    sent = []
    for n, offset in enumerate(offsets):
        if offset < cursor.next:
            continue
        if offset > cursor.next:
            break
        cursor.next = offset + 1
        sent.append(n)
    return sent


def run(sockets: int, batches: int, size: int) -> dict[str, float]:
    keys = {"device": "d:1:x"}
    cores = [
        Delivery(keys, {"device": Head()}, max_replay=10, max_frame_bytes=1024, inbound=TokenBucket(1, 1, 0))
        for _ in range(sockets)
    ]
    for d in cores:
        d.release()
    cursors = [Cursor("e0", 0) for _ in range(sockets)]
    plan = []
    for b in range(batches):
        offsets = list(range(b * size + 1, (b + 1) * size + 1))
        plan.append((offsets, [[o, "x"] for o in offsets]))
    sink = 0
    started = time.perf_counter()
    for offsets, items in plan:
        for d in cores:
            for n in d.offer("device", "e0", items, offsets, False):
                sink += n
    core = time.perf_counter() - started
    started = time.perf_counter()
    for offsets, _items in plan:
        for c in cursors:
            for n in inline_offer(c, offsets):
                sink -= n
    inline = time.perf_counter() - started
    assert sink == 0, "both paths must send the same frames"
    calls = sockets * batches
    return {"core_ns": core / calls * 1e9, "inline_ns": inline / calls * 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    rows = []
    for size in (1, 10, 100):
        runs = [run(args.sockets, args.batches, size) for _ in range(args.repeat)]
        core = statistics.median(r["core_ns"] for r in runs)
        inline = statistics.median(r["inline_ns"] for r in runs)
        rows.append(
            {
                "events_per_batch": size,
                "core_ns_per_offer": core,
                "inline_ns_per_offer": inline,
                "core/inline": core / inline,
            }
        )
    common.report(
        f"delivery core fast path: ns per socket per batch (median of {args.repeat}, {args.sockets} sockets)",
        rows,
        ["events_per_batch", "core_ns_per_offer", "inline_ns_per_offer", "core/inline"],
    )
    print(f"wrote {common.write('delivery_core', rows)}")


if __name__ == "__main__":
    main()
