"""The load client: many WebSocket peers in one asyncio process (not a benchmark by itself).

A benchmark starts several of these (``Pools``) so that one Python process does not limit
what is measured, and counts their CPU. Each peer speaks ``tyrum-v1``: reads ``hello``,
sends ``ping`` as its first frame (nothing to resume) or ``resume`` after a failover, and
records the first arrival time of every event id. Frames are parsed by position (their
layout is fixed by ``streams.event_frame``), with ``json`` as the fallback.

Commands are JSON lines on stdin; each gets one JSON line on stdout:

    {"cmd": "connect", "peers": [[url, token], ...], "concurrency": 50, "budget": secs}
    {"cmd": "count"}                        arrivals so far, open sockets, reconnects
    {"cmd": "collect", "sent": {id: t}, "by_id": false}   latencies (and arrival times) of
                                            those ids; forgets all arrivals
    {"cmd": "failover", "urls": [...], "delay": [lo, hi]}   reconnect dropped peers, resuming
    {"cmd": "disconnect"}                   close every socket (the process stays)
    {"cmd": "exit"}

    python bench/peers.py        (started by bench code, never by hand)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

EVENT_PREFIX = '{"type":"event","stream":"'
OPEN_TIMEOUT_SECS = 60.0
MAX_FRAME_BYTES = 4 * 1024 * 1024
CLOSE_TIMEOUT_SECS = 10.0
# Handshakes a peer tries before it counts as failed (daphne drops a handshake the application
# has not accepted within 5 s, e.g. while an edge works through a connect storm).
CONNECT_ATTEMPTS = 4


def parse_event(raw: str) -> tuple[str, str, int, str]:
    """Return (stream name, epoch, offset, event id) of an ``event`` frame."""
    try:
        s0 = len(EVENT_PREFIX)
        s1 = raw.index('"', s0)
        e0 = raw.index('"epoch":"', s1) + 9
        e1 = raw.index('"', e0)
        o0 = raw.index('"offset":', e1) + 9
        o1 = raw.index(",", o0)
        i0 = raw.index('"event_id":"', o1) + 12
        i1 = raw.index('"', i0)
        return raw[s0:s1], raw[e0:e1], int(raw[o0:o1]), raw[i0:i1]
    except ValueError:
        f = json.loads(raw)
        return f["stream"], f["epoch"], int(f["offset"]), f["event"]["event_id"]


class Peer:
    __slots__ = (
        "url",
        "token",
        "ws",
        "got",
        "pos",
        "dupes",
        "reordered",
        "task",
        "dropped_at",
        "resumed_at",
        "resumed",
    )

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.ws: ClientConnection | None = None
        self.got: dict[str, float] = {}  # event id -> first arrival (epoch seconds)
        self.pos: dict[str, list[Any]] = {}  # stream name -> [epoch, last offset processed]
        self.dupes = 0
        self.reordered = 0  # events that arrived below the stream position (out of order)
        self.task: asyncio.Task[None] | None = None
        self.dropped_at = 0.0
        self.resumed_at = 0.0
        self.resumed: dict[str, Any] | None = None


class Pool:
    def __init__(self) -> None:
        self.peers: list[Peer] = []
        self.failover_urls: list[str] = []
        self.failover_delay = (0.5, 1.5)
        self.closing = False
        self.reconnects = 0
        self.reconnect_failures = 0
        self.odd: list[list[Any]] = []  # samples of out-of-order arrivals

    async def open(self, peer: Peer, *, resume: bool) -> None:
        ws = await connect(
            peer.url,
            subprotocols=[Subprotocol("tyrum-v1")],
            additional_headers={"Authorization": f"Bearer {peer.token}"},
            compression=None,
            proxy=None,
            ping_interval=None,
            max_queue=None,
            max_size=MAX_FRAME_BYTES,
            open_timeout=OPEN_TIMEOUT_SECS,
        )
        hello = json.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_SECS))
        if resume and peer.pos:
            streams = {name: {"epoch": e, "offset": o} for name, (e, o) in peer.pos.items()}
            await ws.send(json.dumps({"type": "resume", "streams": streams}))
        else:
            peer.pos = {name: [h["epoch"], h["offset"]] for name, h in hello["streams"].items()}
            await ws.send('{"type":"ping"}')
        peer.ws = ws

    async def read(self, peer: Peer) -> None:
        while True:
            ws = peer.ws
            if ws is not None:
                try:
                    async for raw in ws:
                        if isinstance(raw, str) and raw.startswith(EVENT_PREFIX):
                            now = time.time()
                            name, epoch, offset, eid = parse_event(raw)
                            pos = peer.pos.get(name)
                            if pos is not None and pos[0] == epoch and offset <= pos[1]:
                                if eid in peer.got:
                                    peer.dupes += 1
                                    continue
                                # A new event below what this peer processed: a late resume's
                                # replay after live events (docs/protocol.md). Kept, as the SDK
                                # does (dedupe by event id), and counted.
                                peer.reordered += 1
                                if len(self.odd) < 50:
                                    self.odd.append([name, epoch, offset, pos[1], eid, time.time()])
                                peer.got[eid] = now
                                continue
                            peer.pos[name] = [epoch, offset]
                            if eid not in peer.got:
                                peer.got[eid] = now
                        elif isinstance(raw, str) and raw.startswith('{"type":"resumed"'):
                            peer.resumed_at = time.time()
                            peer.resumed = json.loads(raw)["streams"]
                except ConnectionClosed:
                    pass
            if self.closing or not self.failover_urls:
                return
            peer.dropped_at = time.time()
            peer.ws = None
            await asyncio.sleep(random.uniform(*self.failover_delay))
            for attempt in range(20):  # bounded: 20 tries over the failover edges
                try:
                    peer.url = self.failover_urls[attempt % len(self.failover_urls)]
                    await self.open(peer, resume=True)
                    self.reconnects += 1
                    break
                except Exception:
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                self.reconnect_failures += 1
                return

    async def connect(self, pairs: list[list[str]], concurrency: int, budget_secs: float) -> dict[str, Any]:
        """Connect peers, ``concurrency`` handshakes at a time; start none after ``budget_secs``."""
        sem = asyncio.Semaphore(concurrency)
        errors: dict[str, int] = {}
        started = time.monotonic()
        done_at: list[float] = []
        skipped = retries = 0

        async def one(url: str, token: str) -> None:
            nonlocal skipped, retries
            peer = Peer(url, token)
            for attempt in range(CONNECT_ATTEMPTS):  # a real client retries a refused handshake
                async with sem:
                    if time.monotonic() - started > budget_secs:
                        skipped += 1
                        return
                    try:
                        await self.open(peer, resume=False)
                        break
                    except Exception as exc:
                        if attempt + 1 == CONNECT_ATTEMPTS:
                            key = type(exc).__name__ + (f" {exc}"[:80] if str(exc) else "")
                            errors[key] = errors.get(key, 0) + 1
                            return
                        retries += 1
                await asyncio.sleep(random.uniform(0.5, 1.5) * (attempt + 1))
            done_at.append(time.monotonic() - started)
            self.peers.append(peer)
            peer.task = asyncio.create_task(self.read(peer))

        await asyncio.gather(*(one(url, token) for url, token in pairs))
        return {
            "connected": len(done_at),
            "failed": sum(errors.values()),
            "skipped": skipped,
            "retries": retries,
            "errors": errors,
            "secs": (max(done_at) if done_at else time.monotonic() - started),
        }

    def count(self) -> dict[str, Any]:
        return {
            "received": sum(len(p.got) for p in self.peers),
            "resumed": sum(1 for p in self.peers if p.resumed_at),
            "dropped": sum(1 for p in self.peers if p.dropped_at),
            "open": sum(1 for p in self.peers if p.ws is not None and p.ws.state.name == "OPEN"),
            "reconnects": self.reconnects,
            "reconnect_failures": self.reconnect_failures,
        }

    def collect(self, sent: dict[str, float], by_id: bool) -> dict[str, Any]:
        lat: list[float] = []
        arrivals: dict[str, float] = {}
        last = 0.0
        stray = dupes = reordered = 0
        for p in self.peers:
            for eid, t in p.got.items():
                t0 = sent.get(eid)
                if t0 is None:
                    stray += 1
                    continue
                lat.append(round((t - t0) * 1000, 3))
                if by_id:
                    arrivals[eid] = t
                last = max(last, t)
            p.got = {}
            dupes += p.dupes
            reordered += p.reordered
            p.dupes = p.reordered = 0
        odd, self.odd = self.odd, []
        failovers = [
            {"dropped_at": p.dropped_at, "resumed_at": p.resumed_at, "resumed": p.resumed}
            for p in self.peers
            if p.dropped_at
        ]
        return {
            "latencies_ms": lat,
            "arrivals": arrivals,
            "last_arrival": last,
            "stray": stray,
            "dupes": dupes,
            "reordered": reordered,
            "failovers": failovers,
            "odd": odd,
        }

    async def disconnect(self) -> None:
        self.closing = True
        closes = [asyncio.create_task(p.ws.close()) for p in self.peers if p.ws is not None]
        if closes:  # all at once, bounded: a backlogged edge may never answer the close
            done, pending = await asyncio.wait(closes, timeout=CLOSE_TIMEOUT_SECS)
            for t in pending:
                t.cancel()
            for t in done:
                with contextlib.suppress(BaseException):
                    t.result()
        for p in self.peers:
            if p.task is not None:
                p.task.cancel()
        await asyncio.gather(*(p.task for p in self.peers if p.task), return_exceptions=True)
        self.peers = []
        self.closing = False
        self.failover_urls = []
        self.reconnects = self.reconnect_failures = 0


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pool = Pool()

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "connect":
            answer(await pool.connect(msg["peers"], int(msg.get("concurrency", 50)), float(msg.get("budget", 600))))
        elif cmd == "count":
            answer(pool.count())
        elif cmd == "collect":
            answer(pool.collect(msg["sent"], bool(msg.get("by_id"))))
        elif cmd == "failover":
            pool.failover_urls = list(msg["urls"])
            pool.failover_delay = tuple(msg.get("delay", (0.5, 1.5)))  # type: ignore[assignment]
            answer({"ok": True})
        elif cmd == "disconnect":
            await pool.disconnect()
            answer({"ok": True})
        elif cmd == "exit":
            await pool.disconnect()
            answer({"ok": True})
            break


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve())


if __name__ == "__main__":
    main()
