"""The relay's doorbell: a low-latency wake-up rung after a producer's commit.

Never a source of truth: a lost ring only delays delivery until the relay's next poll.
With ``REDIS_URL`` the ring is a Redis PUBLISH (measured ~3.5 ms commit→wake here, against
~5 ms for NOTIFY from a post-commit transaction, and NOTIFY inside the producer's
transaction serialises all committers). Without Redis (embedded mode) it is in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from typing import Any

from backplane.conf import conf

logger = logging.getLogger(__name__)

_client: Any = None
_client_lock = threading.Lock()
_local: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()


def channel_name() -> str:
    return f"{conf.channel_prefix}:doorbell"


def _redis() -> Any:
    global _client
    with _client_lock:
        if _client is None:
            import redis

            _client = redis.Redis.from_url(conf.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return _client


_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
_sender: threading.Thread | None = None


def ring(shard: int) -> None:
    """Wake the relays; never raises and never waits (the relay's polling covers a lost ring).

    The Redis PUBLISH happens on a background thread, so a producer's commit does not wait
    for a round trip to Redis; rings that queue up meanwhile are sent as one.
    """
    for loop, event in list(_local):
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # loop closed
            _local.discard((loop, event))
    if not conf.redis_url:
        return
    global _sender
    if _sender is None or not _sender.is_alive():
        with _client_lock:
            if _sender is None or not _sender.is_alive():
                _sender = threading.Thread(target=_send_rings, name="tyrum-doorbell", daemon=True)
                _sender.start()
    _queue.put(shard)


def _send_rings() -> None:
    while True:
        shards = {_queue.get()}
        while True:  # coalesce what queued up meanwhile
            try:
                shards.add(_queue.get_nowait())
            except queue.Empty:
                break
        try:
            _redis().publish(channel_name(), ",".join(str(s) for s in sorted(shards)))
        except Exception as exc:  # the doorbell is an optimisation, not a dependency
            logger.warning("doorbell ring failed: %s", type(exc).__name__, extra={"action": "doorbell_failed"})


class Listener:
    """Waits for rings. Use ``async with Listener() as bell: await bell.wait(timeout)``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._key: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    async def __aenter__(self) -> Listener:
        self._key = (asyncio.get_running_loop(), self._event)
        _local.add(self._key)
        if conf.redis_url:
            self._task = asyncio.create_task(self._subscribe())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._key:
            _local.discard(self._key)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _subscribe(self) -> None:
        import redis.asyncio as aredis

        backoff = 0.2
        while True:
            client = aredis.Redis.from_url(conf.redis_url, socket_connect_timeout=2.0)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel_name())
                    backoff = 0.2
                    self._event.set()  # we may have missed rings while (re)subscribing
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("doorbell subscription lost: %s", type(exc).__name__, extra={"action": "doorbell_lost"})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                await client.aclose()

    async def wait(self, timeout: float) -> bool:
        """Wait for a ring or ``timeout`` seconds; return True if it rang."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            rang = True
        except TimeoutError:
            rang = False
        self._event.clear()
        return rang
