"""In-process protocol tests: the real consumer and edge runtime behind the ASGI routing,
driven by channels' ``WebsocketCommunicator`` on the in-memory channel layer, a relay in
this process, and the test database (SQLite alone, or PostgreSQL under ``make test``).
No server, no Redis (harness/inprocess.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness import inprocess


@pytest.fixture
async def edge(committed_db: None, settings: Any) -> AsyncIterator[inprocess.InProcessEdge]:
    """One edge of its own (a fresh in-memory layer and runtime, a new edge id) and a relay;
    everything stopped after the test."""
    settings.CHANNEL_LAYERS = inprocess.IN_MEMORY_LAYERS
    settings.EDGE_ID = inprocess.new_edge_id()
    async with inprocess.running_edge() as running:
        yield running
