"""Integration fixtures: the real channel layer (Redis), relays on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections


@pytest.fixture(autouse=True)
def _close_sync_thread_connections() -> Iterator[None]:
    """Close the DB connection of asgiref's sync thread after each test.

    ``database_sync_to_async`` keeps a persistent connection in that thread; left open it
    would keep the test database from being dropped at the end of the session.
    """
    yield
    asyncio.run(sync_to_async(connections.close_all)())


@pytest.fixture
async def layer(services: None) -> AsyncIterator[Any]:
    """The project's configured channel layer (channels-redis), flushed after the test."""
    from channels.layers import get_channel_layer

    channel_layer = get_channel_layer()
    assert channel_layer is not None
    yield channel_layer
    await channel_layer.flush()


@pytest.fixture
async def make_relay(layer: Any) -> AsyncIterator[Any]:
    """Build ``Relay`` objects on the real layer; they are closed (leases released) afterwards."""
    from backplane.relay import Relay

    made: list[Relay] = []

    def make(**kwargs: Any) -> Relay:
        relay = Relay(layer, **kwargs)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        await relay.aclose()
