"""Timestamps of each batch on its hop relay → Redis → edge → socket (``bench/hop_trace.py``).

Off unless ``TYRUM_HOP_TRACE`` names a directory when the process starts; then each
relay and edge process appends one JSON line per batch to ``<dir>/<role>-<pid>.jsonl``:
the batch's stream and offsets and the wall-clock time (``time.time()``) of each step. Off,
it costs the code on the path one test of a module constant per batch. Only stream keys,
offsets and times are written: never a payload.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path
from typing import Any

ON = bool(os.environ.get("TYRUM_HOP_TRACE"))
# Lines are written out at most this often (and when the buffer is this long), not per batch.
FLUSH_SECS = 0.5
FLUSH_LINES = 2000

_lines: list[str] = []
_flushed_at = 0.0
# Per layer channel: when the layer's reader task took each raw message off Redis, in order
# (the channel's queue is FIFO, so the receiver pops them in the same order).
reads: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
# The time the last message's decryption and unpacking took (seconds).
last_decode = 0.0
_tasks: set[Any] = set()
watched: set[str] = set()  # the channels whose reads are noted (not the commands')


def record(role: str, steps: dict[str, float], rows: list[tuple[str, int]]) -> None:
    """Keep one batch's step times; write the buffer out now and then."""
    global _flushed_at
    _lines.append(json.dumps({"role": role, "t": steps, "rows": rows}))
    now = time.monotonic()
    if len(_lines) >= FLUSH_LINES or now - _flushed_at >= FLUSH_SECS:
        _flushed_at = now
        flush(role)


def flush(role: str) -> None:
    directory = os.environ.get("TYRUM_HOP_TRACE")
    if not directory or not _lines:
        return
    with (Path(directory) / f"{role}-{os.getpid()}.jsonl").open("a") as out:
        out.write("\n".join(_lines) + "\n")
    _lines.clear()


def start_flusher(role: str) -> None:
    """Write the buffer out every FLUSH_SECS from a task of the running loop (the last
    batches of a run are written without waiting for more)."""
    import asyncio

    async def flusher() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECS)
            flush(role)

    _tasks.add(asyncio.get_running_loop().create_task(flusher()))


# How often the loop-lag probe wakes; the worst lateness of its wake-ups since it was last taken.
LAG_PROBE_SECS = 0.002
_max_lag = 0.0


def start_lag_probe() -> None:
    """Measure how late the running loop runs its callbacks: a task sleeping LAG_PROBE_SECS
    over and over notes how much later than asked it woke (the loop busy, or the process
    off the CPU). ``take_lag`` returns the worst since the last call."""
    import asyncio

    async def probe() -> None:
        global _max_lag
        while True:
            began = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_SECS)
            _max_lag = max(_max_lag, time.perf_counter() - began - LAG_PROBE_SECS)

    _tasks.add(asyncio.get_running_loop().create_task(probe()))


def take_lag() -> float:
    """The loop's worst lateness (seconds) since the last call."""
    global _max_lag
    lag, _max_lag = _max_lag, 0.0
    return lag


def runq_wait() -> float:
    """Seconds this process's main thread has spent runnable but waiting for a CPU, so far
    (the kernel's schedstat; 0.0 where there is none)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def install_layer_probes(layer: Any, channel: str) -> None:
    """Note when the pub/sub layer's reader task takes each message for ``channel`` (the
    edge's delivery channel) off Redis, and how long each decode takes (wrapping two of the
    layer's methods; only when tracing)."""
    watched.add(channel)
    from channels_redis.pubsub import RedisSingleShardConnection

    if not getattr(RedisSingleShardConnection, "_tyrum_traced", False):
        _probe_reads(RedisSingleShardConnection)
    deserialize = layer.deserialize

    def timed(message: bytes) -> Any:
        global last_decode
        began = time.perf_counter()
        try:
            return deserialize(message)
        finally:
            last_decode = time.perf_counter() - began

    layer.deserialize = timed


def read_time(channel: str) -> float:
    """When the message just received on ``channel`` came off Redis (0.0 if unknown)."""
    pending = reads.get(channel)
    return pending.popleft() if pending else 0.0


def _probe_reads(connection_class: Any) -> None:
    original = connection_class._receive_message

    def _receive_message(self: Any, message: Any) -> None:
        if message is not None:
            now = time.time()
            name = message["channel"]
            if isinstance(name, bytes):
                name = name.decode()
            layer_channels = self.channel_layer.channels
            if name in layer_channels:
                if name in watched:
                    reads[name].append(now)
            else:
                for channel in self.channel_layer.groups.get(name, ()):
                    if channel in layer_channels and channel in watched:
                        reads[channel].append(now)
        original(self, message)

    connection_class._receive_message = _receive_message
    connection_class._tyrum_traced = True
