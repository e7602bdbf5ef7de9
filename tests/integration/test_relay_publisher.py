"""The relay's publisher on its own connection (``vendor.channels_redis.WirePublisher``).

It writes what the layer's ``group_send`` writes (the subscribers read the same message),
returns each PUBLISH's count of subscribers (the relay keeps a command nobody heard), and
after a call given up on, or a connection Redis dropped, the next call opens a fresh one.
Reply bookkeeping without Redis: tests/unit/test_vendor.py.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis.asyncio as aredis
from django.conf import settings

from backplane.vendor import channels_redis as vendor_redis

from .helpers import TIMEOUT, eventually, group_of, join

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STREAM = "d:00000000-0000-0000-0000-000000000001:dev-1"


def publisher_of(layer: Any) -> vendor_redis.PubSubPublisher:
    publisher = vendor_redis.PubSubPublisher.for_layer(layer, settings.REDIS_URL, 2.0)
    assert isinstance(publisher, vendor_redis.WirePublisher)  # a redis:// URL gets the wire
    return publisher


async def test_wire_publisher__subscribers_read_what_it_publishes_with_the_counts(layer: Any) -> None:
    channel = await join(layer, STREAM)
    publisher = publisher_of(layer)
    try:
        first = {"type": "bp.batch", "stream": STREAM, "epoch": "e", "items": [[1, "{}"]]}
        second = {"type": "bp.batch", "stream": STREAM, "epoch": "e", "items": [[2, "{}"], [3, "{}"]]}
        nobody = group_of("d:00000000-0000-0000-0000-000000000002:dev-9")
        counts = await publisher.publish_all([(group_of(STREAM), first), (nobody, first), (group_of(STREAM), second)])
        assert counts == [1, 0, 1]
        assert await asyncio.wait_for(layer.receive(channel), TIMEOUT) == first
        assert await asyncio.wait_for(layer.receive(channel), TIMEOUT) == second
        assert await publisher.publish_all([]) == []
    finally:
        await publisher.aclose()


async def test_wire_publisher__a_call_given_up_on_leaves_the_next_one_its_own_replies(layer: Any) -> None:
    channel = await join(layer, STREAM)
    publisher = publisher_of(layer)
    try:
        await publisher.publish_all([(group_of(STREAM), {"type": "probe", "n": 0})])
        assert await asyncio.wait_for(layer.receive(channel), TIMEOUT) == {"type": "probe", "n": 0}
        opened = publisher._replies
        call = asyncio.ensure_future(publisher.publish_all([(group_of(STREAM), {"type": "probe", "n": 1})]))
        for _ in range(1000):  # until it has written and waits for its reply
            if opened is not None and opened.waiting:
                break
            await asyncio.sleep(0)
        assert opened is not None and opened.waiting
        call.cancel()  # given up on before its reply (the relay's timeout): the connection goes
        with pytest.raises(asyncio.CancelledError):
            await call
        assert publisher._replies is None
        assert opened.transport is not None and opened.transport.is_closing()
        assert await publisher.publish_all([(group_of(STREAM), {"type": "probe", "n": 2})]) == [1]
        assert publisher._replies is not opened
        got = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        if got == {"type": "probe", "n": 1}:  # written before it was given up on: at most once more
            got = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        assert got == {"type": "probe", "n": 2}
    finally:
        await publisher.aclose()


async def test_wire_publisher__a_connection_redis_dropped_is_opened_again(layer: Any) -> None:
    channel = await join(layer, STREAM)
    publisher = publisher_of(layer)
    admin = aredis.Redis.from_url(settings.REDIS_URL)
    try:
        assert await publisher.publish_all([(group_of(STREAM), {"type": "probe", "n": 1})]) == [1]
        dropped = publisher._replies
        assert dropped is not None
        clients = await admin.client_list()
        mine = [c for c in clients if c.get("name") == f"tyrum-relay-{os.getpid()}"]
        assert len(mine) == 1
        await admin.client_kill_filter(_id=mine[0]["id"])

        async def lost() -> bool:
            return dropped.lost

        await eventually(lost)
        assert await publisher.publish_all([(group_of(STREAM), {"type": "probe", "n": 2})]) == [1]
        assert publisher._replies is not dropped
        assert await asyncio.wait_for(layer.receive(channel), TIMEOUT) == {"type": "probe", "n": 1}
        assert await asyncio.wait_for(layer.receive(channel), TIMEOUT) == {"type": "probe", "n": 2}
    finally:
        await publisher.aclose()
        await admin.aclose()
