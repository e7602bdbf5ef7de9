"""The edge's side of a fan-out, in one process: what handing one relay batch to every socket
of its stream costs, per delivered frame — ``EdgeRuntime.deliver`` (the frame bytes built
once, each socket's ``GatewayConsumer.offer``, its ``Delivery`` and the direct write into the
per-turn coalescer) and the end of the loop turn (``Coalescer.flush_all``: one ``send()``
per socket), on real ``GatewayConsumer`` objects and real loopback TCP sockets. No Redis,
no daphne, no peers: the figure does not move with the rest of the machine the way an
end-to-end fan-out does (docs/decisions/0028-fan-out-per-socket-cost.md).

    .venv/bin/python bench/fanout_core.py [--sockets 500] [--batches 400] [--events 1,4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")
os.environ.setdefault("SECRET_KEY", "tyrum-bench-fanout-core")
import common  # noqa: E402
import django  # noqa: E402

django.setup()

from backplane import protocol  # noqa: E402
from backplane.consumers import GatewayConsumer  # noqa: E402
from backplane.delivery import Delivery, TokenBucket  # noqa: E402
from backplane.edge import EdgeRuntime  # noqa: E402
from backplane.vendor import daphne as vendor_daphne  # noqa: E402

KEY = "t:00000000-0000-0000-0000-000000000001"


class Head:
    epoch, offset, first_retained = "e0", 0, 1


class Transport:
    """A twisted TCP transport as the edge's direct writes see it, on a real socket."""

    TLS = False

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.disconnected = self.disconnecting = False
        self.dataBuffer = b""
        self.offset = self._tempDataLen = 0

    def write(self, data: bytes) -> None:
        raise AssertionError("the peer reads fast enough: twisted's buffer is never needed here")


class Proto:
    """daphne's protocol object as the direct writes see it (hashed in Python, like daphne's)."""

    STATE_OPEN, SEND_STATE_GROUND = 1, 0

    def __init__(self, sock: socket.socket) -> None:
        self.state, self.send_state = self.STATE_OPEN, self.SEND_STATE_GROUND
        self.transport = Transport(sock)

    def __hash__(self) -> int:
        return hash(id(self))

    def __eq__(self, other: object) -> bool:
        return self is other


class Layer:
    async def group_add(self, group: str, channel: str) -> None:
        pass


def consumer(proto: Proto, coalescer: Any) -> GatewayConsumer:
    c = GatewayConsumer()
    c.connection_id = f"c{id(c)}"
    c.closed = False
    c.keys = {"tenant": KEY}
    c.early = []
    c.drainer = None
    c.lock = asyncio.Lock()
    c.delivery = Delivery(
        c.keys, {"tenant": Head()}, max_replay=100, max_frame_bytes=4096, inbound=TokenBucket(1, 1, 0.0)
    )
    c.delivery.release()
    c.wire = proto
    c.coalescer = coalescer
    return c


def tcp_pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    pairs = []
    for _ in range(n):
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        ours.setblocking(False)
        peer.setblocking(False)
        pairs.append((ours, peer))
    listener.close()
    return pairs


def drain(peers: list[socket.socket]) -> int:
    got = 0
    for p in peers:
        try:
            while True:
                chunk = p.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
        except BlockingIOError:
            pass
    return got


async def run(sockets: int, batches: int, events: int) -> dict[str, float]:
    pairs = tcp_pairs(sockets)
    try:
        vendor_daphne.PLAIN_TCP = Transport  # type: ignore[misc]
        vendor_daphne._FileDescriptor = Transport  # type: ignore[misc]
        runtime = EdgeRuntime("bench-edge", layer=Layer(), store=object())  # type: ignore[arg-type]
        runtime.stream_channel = "c"
        coalescer = vendor_daphne.Coalescer(asyncio.get_running_loop())
        for ours, _ in pairs:
            await runtime.subscribe(consumer(Proto(ours), coalescer))  # type: ignore[arg-type]
        peers = [p for _, p in pairs]
        deliver_s = flush_s = 0.0
        offset = 0
        expected = 0
        for _ in range(batches):
            items = []
            for _ in range(events):
                offset += 1
                frame = protocol.event_frame(
                    "tenant", "e0", offset, f"0193a1b2-c3d4-7e5f-8a9b-{offset:012d}", "bench.tick",
                    "2026-12-05T03:00:00.000000Z", '{"n":1,"pad":"' + "x" * 64 + '"}',
                )  # fmt: skip
                items.append([offset, frame])
                expected += len(frame.encode()) + 2
            message = {"type": "bp.batch", "stream": KEY, "epoch": "e0", "items": items}
            t0 = time.perf_counter()
            await runtime.deliver(message)
            t1 = time.perf_counter()
            coalescer.flush_all()
            t2 = time.perf_counter()
            deliver_s += t1 - t0
            flush_s += t2 - t1
            drain(peers)
        got = drain(peers)
        frames = sockets * batches * events
        return {"deliver_us": deliver_s / frames * 1e6, "flush_us": flush_s / frames * 1e6, "left": got}
    finally:
        for ours, peer in pairs:
            ours.close()
            peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=500, help="one edge's share of 1000 peers")
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--events", default="1,4", help="events per relay batch")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    rows = []
    for events in (int(e) for e in args.events.split(",")):
        runs = [asyncio.run(run(args.sockets, args.batches, events)) for _ in range(args.repeat)]
        deliver = statistics.median(r["deliver_us"] for r in runs)
        flush = statistics.median(r["flush_us"] for r in runs)
        rows.append(
            {
                "events_per_batch": events,
                "deliver_us_per_frame": deliver,
                "flush_us_per_frame": flush,
                "total_us_per_frame": deliver + flush,
            }
        )
    common.report(
        f"edge fan-out core: µs per delivered frame (median of {args.repeat}; {args.sockets} sockets, "
        f"{args.batches} batches): deliver = runtime → sockets → coalescer, flush = one send() per socket",
        rows,
        ["events_per_batch", "deliver_us_per_frame", "flush_us_per_frame", "total_us_per_frame"],
    )
    print(f"wrote {common.write('fanout_core', rows, {'args': vars(args)})}")


if __name__ == "__main__":
    main()
