"""A raw-Channels sender process: the floor under the backplane (not a benchmark by itself).

Sends pre-rendered event frames straight to the device groups with ``group_send`` on the
configured channel layer — no outbox, no relay — in the message format the edge consumer
takes from the relay (``bp.batch``). The edge drops offsets it has already delivered and
fills gaps from the outbox, so each stream's offsets continue exactly from where its peer
is (``next`` in the targets file) and the streams of different senders are disjoint.
Records the time just before each ``group_send``. Prints one JSON object
{"sent": {event_id: send_time}, "next": {stream: next offset}, "start", "end", "cpu_s"}.

    python bench/floor_proc.py --url URL --prefix P --rate R --seconds S --targets FILE --tag T
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TICK_SECS = 0.005
PAD = "x" * 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--targets", required=True, help="JSON file: [[stream_key, epoch, next_offset], ...]")
    parser.add_argument("--tag", required=True, help="makes this run's event ids unique")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch seconds: senders start together")
    args = parser.parse_args()
    common.setup_django(args.url, args.prefix)
    print(json.dumps(asyncio.run(send(args))))


async def send(args: argparse.Namespace) -> dict[str, object]:
    from channels.layers import get_channel_layer

    from backplane import streams
    from backplane.conf import conf

    layer = get_channel_layer()
    targets = json.loads(Path(args.targets).read_text())
    groups = [streams.group_name(conf.channel_prefix, key) for key, _, _ in targets]
    nxt = {key: int(off) for key, _, off in targets}
    rng = random.Random(args.seed)
    sent: dict[str, float] = {}
    target: dict[str, str] = {}
    occurred = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    # Connect before the clock starts, on a group no edge listens to.
    await layer.group_send(f"bp.{args.prefix}.warmup", {"type": "bench.warmup"})
    time.sleep(min(10.0, max(0.0, args.start_at - time.time())))
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
        for _ in range(max(0, due)):
            i = rng.randrange(len(targets))
            key, epoch, _ = targets[i]
            offset = nxt[key]
            nxt[key] = offset + 1
            eid = f"fl-{args.tag}-{n}"
            payload = json.dumps({"n": n, "pad": PAD}, separators=(",", ":"))
            frame = streams.event_frame("device", epoch, streams.Item(offset, eid, "bench.tick", occurred, payload))
            target[eid] = key
            sent[eid] = time.time()
            await layer.group_send(
                groups[i], {"type": "bp.batch", "stream": key, "epoch": epoch, "items": [[offset, frame]]}
            )
            n += 1
        await asyncio.sleep(max(0.0, TICK_SECS - (time.monotonic() - now)))
    return {
        "sent": sent,
        "target": target,
        "next": nxt,
        "start": start_wall,
        "end": time.time(),
        "cpu_s": time.process_time() - cpu0,
    }


if __name__ == "__main__":
    main()
