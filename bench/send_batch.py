"""What one fan-out's writes cost the kernel: the same frame to each of N loopback TCP sockets,
as one ``send()`` per socket (what the edge's coalescer does at the end of a loop turn) and as
one ``io_uring_enter`` submitting every socket's send at once (Linux 5.6 and later). The
Python around each is as small as it can be on both sides — a bare loop of ``sock.send``; a
prebuilt block of submission entries copied in with one slice assignment — so the difference
is what batching the system calls could save the edge per delivered frame
(docs/decisions/0050-fan-out-sends-stay-one-send-per-socket.md).

Loopback: the sender's ``send()`` also runs the receiving side's TCP processing, as it
would not over a network; both modes pay that alike. No third-party code: the ring is set up
with ``ctypes`` and ``mmap``. Where io_uring is missing or disabled its row says so.

    .venv/bin/python bench/send_batch.py [--sockets 500] [--rounds 400] [--frame-bytes 132]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import mmap
import socket
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SYS_IO_URING_SETUP, SYS_IO_URING_ENTER = 425, 426  # the same numbers on x86_64 and aarch64
OP_SEND, MSG_DONTWAIT, ENTER_GETEVENTS, FEAT_SINGLE_MMAP = 26, 0x40, 1, 1
OFF_SQES, MAP_POPULATE = 0x10000000, 0x8000


class Ring:
    """A minimal io_uring: one submission per socket, all submitted and reaped in one call."""

    def __init__(self, entries: int) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        fd = self.libc.syscall(SYS_IO_URING_SETUP, entries, params)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")
        self.fd = fd
        raw = bytes(params)
        sq_entries, cq_entries, _, _, _, features = struct.unpack_from("6I", raw, 0)
        if not features & FEAT_SINGLE_MMAP:
            raise OSError("io_uring without IORING_FEAT_SINGLE_MMAP")
        sq = struct.unpack_from("7I", raw, 40)  # head, tail, mask, entries, flags, dropped, array
        cq = struct.unpack_from("6I", raw, 80)  # head, tail, mask, entries, overflow, cqes
        size = max(sq[6] + sq_entries * 4, cq[5] + cq_entries * 16)
        flags, prot = mmap.MAP_SHARED | MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE
        self.ring = mmap.mmap(fd, size, flags, prot, offset=0)
        self.sqes = mmap.mmap(fd, sq_entries * 64, flags, prot, offset=OFF_SQES)
        self.sq_entries, self.cq_entries = sq_entries, cq_entries
        self.sq_tail, self.sq_mask, self.sq_array = sq[1] // 4, sq[2], sq[6]
        self.cq_head, self.cq_tail, self.cq_mask, self.cqes = cq[0] // 4, cq[1] // 4, cq[2], cq[5]
        self.mv = memoryview(self.ring)
        self.u32 = self.mv.cast("I")
        self.ident = memoryview(array.array("I", range(sq_entries)))
        self.results = self.mv[self.cqes : self.cqes + cq_entries * 16].cast("i")[2::4]  # each CQE's res

    @staticmethod
    def block(fds: list[int], addr: int, length: int) -> bytes:
        """The submission entries: a non-blocking send of ``length`` bytes at ``addr`` per fd."""
        sqe = struct.Struct("<BBHiQQIIQ24x")  # opcode, flags, ioprio, fd, off, addr, len, msg_flags, user_data
        return b"".join(sqe.pack(OP_SEND, 0, 0, fd, 0, addr, length, MSG_DONTWAIT, i) for i, fd in enumerate(fds))

    def send_all(self, n: int, block: bytes, length: int) -> bool:
        """Submit the ``n`` sends of ``block`` and wait for them; whether each sent it all."""
        self.sqes[: n * 64] = block
        tail = self.u32[self.sq_tail]
        slots = self.mv[self.sq_array : self.sq_array + self.sq_entries * 4].cast("I")
        start = tail & self.sq_mask
        first = min(n, self.sq_entries - start)
        slots[start : start + first] = self.ident[:first]
        if first < n:
            slots[: n - first] = self.ident[first:n]
        self.u32[self.sq_tail] = (tail + n) & 0xFFFFFFFF
        if self.libc.syscall(SYS_IO_URING_ENTER, self.fd, n, n, ENTER_GETEVENTS, None, 0) < 0:
            raise OSError(ctypes.get_errno(), "io_uring_enter")
        head, ctail = self.u32[self.cq_head], self.u32[self.cq_tail]
        begin, end = head & self.cq_mask, (head & self.cq_mask) + ((ctail - head) & 0xFFFFFFFF)
        parts = (
            [self.results[begin:end]]
            if end <= self.cq_entries
            else [
                self.results[begin:],
                self.results[: end - self.cq_entries],
            ]
        )
        self.u32[self.cq_head] = ctail
        return (ctail - head) & 0xFFFFFFFF == n and all(min(p) == length == max(p) for p in parts if len(p))


def socket_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket], socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    senders, readers = [], []
    for _ in range(n):
        reader = socket.create_connection(listener.getsockname())
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reader.setblocking(False)
        sender, _ = listener.accept()
        sender.setblocking(False)
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as twisted's
        senders.append(sender)
        readers.append(reader)
    return senders, readers, listener


def drain(readers: list[socket.socket]) -> None:
    for r in readers:
        try:
            while r.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=500, help="one edge's share of the fan-out's 1000 peers")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--frame-bytes", type=int, default=132, help="a small event frame")
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    frame = b"\x81\x7e" + struct.pack("!H", args.frame_bytes - 4) + b"x" * (args.frame_bytes - 4)
    senders, readers, listener = socket_pairs(args.sockets)
    n = len(senders)
    buffer = ctypes.create_string_buffer(frame, len(frame))
    ring: Ring | None = None
    why = ""
    try:
        ring = Ring(1 << (n - 1).bit_length())
        block = Ring.block([s.fileno() for s in senders], ctypes.addressof(buffer), len(frame))
    except OSError as exc:
        why = f"io_uring unavailable: {exc}"
    wall: dict[str, list[float]] = {"send() per socket": [], "io_uring, one enter": []}
    cpu: dict[str, float] = dict.fromkeys(wall, 0.0)
    for rnd in range(args.rounds):  # bounded; the two modes alternate round by round
        if rnd % 25 == 0:
            drain(readers)
        c0, t0 = time.process_time(), time.perf_counter()
        for s in senders:
            s.send(frame)
        c1, t1 = time.process_time(), time.perf_counter()
        wall["send() per socket"].append((t1 - t0) / n * 1e6)
        cpu["send() per socket"] += c1 - c0
        if ring is not None:
            ok = ring.send_all(n, block, len(frame))
            c2, t2 = time.process_time(), time.perf_counter()
            if not ok:
                raise SystemExit("io_uring: a send did not complete in full")
            wall["io_uring, one enter"].append((t2 - t1) / n * 1e6)
            cpu["io_uring, one enter"] += c2 - c1
    for s in (*senders, *readers, listener):
        s.close()
    rows: list[dict[str, Any]] = []
    base = statistics.median(wall["send() per socket"])
    for mode, samples in wall.items():
        if not samples:
            rows.append({"mode": mode, "note": why})
            continue
        med = statistics.median(samples)
        rows.append(
            {
                "mode": mode,
                "wall_us_per_send": med,
                "cpu_us_per_send": cpu[mode] / len(samples) / n * 1e6,
                "wall_vs_send": med / base,
            }
        )
    common.report(
        f"one fan-out's writes: {n} loopback sockets × {args.rounds} rounds, a {len(frame)}-byte frame "
        "(median per round; CPU over all rounds)",
        rows,
        ["mode", "wall_us_per_send", "cpu_us_per_send", "wall_vs_send", "note"],
    )
    print(f"wrote {common.write('send_batch', rows, {'args': vars(args)})}")


if __name__ == "__main__":
    main()
