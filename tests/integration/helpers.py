"""Helpers for integration tests: the ORM from async code, channel-layer probes, bounded waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async

from backplane import streams
from backplane.conf import conf

# Bound on every single wait (seconds).
TIMEOUT = 5.0


async def orm(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in asgiref's sync thread (the ORM is sync-only)."""
    return await sync_to_async(fn)(*args, **kwargs)


def group_of(stream_key: str) -> str:
    if streams.audience_of(stream_key) == "edge":
        return streams.edge_group(conf.channel_prefix, stream_key[2:])
    return streams.group_name(conf.channel_prefix, stream_key)


async def join(layer: Any, *stream_keys: str) -> str:
    """Return a fresh channel in the groups of ``stream_keys``, with live subscriptions.

    A probe round trip per group proves each subscription is active before anything is sent.
    """
    channel = await layer.new_channel()
    for key in stream_keys:
        group = group_of(key)
        await layer.group_add(group, channel)
        await layer.group_send(group, {"type": "probe", "group": group})
        message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        assert message == {"type": "probe", "group": group}
    return channel


async def drain(layer: Any, channel: str, via_stream: str) -> list[dict[str, Any]]:
    """Return every message that reached ``channel`` before a sentinel sent now.

    The sentinel travels the same publisher and subscriber connections as the relay's
    sends, so everything sent before it arrives before it.
    """
    marker = {"type": "sentinel", "at": time.monotonic()}
    await layer.group_send(group_of(via_stream), marker)
    got: list[dict[str, Any]] = []
    while True:
        message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        if message == marker:
            return got
        got.append(message)


def items_of(messages: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """Flatten ``bp.batch`` messages into (stream key, offset, parsed frame)."""
    out = []
    for message in messages:
        assert message["type"] == "bp.batch"
        for offset, frame in message["items"]:
            out.append((message["stream"], offset, json.loads(frame)))
    return out


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT, interval: float = 0.05) -> Any:
    """Await ``probe()`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
