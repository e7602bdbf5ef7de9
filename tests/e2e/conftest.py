"""E2E fixtures: real daphne edges and relays over the test database and Redis, and peers on
the stock ``websockets`` client (``harness.peer.Peer``, written only from docs/protocol.md).

Processes are module-scoped where a module can share them (starting daphne costs seconds on
a small machine); tests that crash, freeze or reconfigure processes start their own. Data is
per test: each test makes its own tenants and tokens (``e2e_db`` in tests/conftest.py). Every
process is stopped by its PID in a fixture teardown, and every wait is bounded.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import Cluster
from harness.peer import Peer


@pytest.fixture
async def peers() -> AsyncIterator[Any]:
    """Open peers through ``await peers(url, token, ...)``; all are closed after the test."""
    opened: list[Peer] = []

    async def make(url: str, token: str | None = None, **kw: Any) -> Peer:
        peer = await Peer.open(url, token, **kw)
        opened.append(peer)
        return peer

    yield make
    for peer in opened:
        await peer.close()


def _module_tag(request: pytest.FixtureRequest) -> str:
    name = Path(str(request.module.__file__)).stem.removeprefix("test_").replace("_", "-")
    return f"e2e-{name}-{os.getpid()}"


@pytest.fixture(scope="module")
def module_cluster(module_env: dict[str, str], request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two edges and one relay, shared by the tests of one module."""
    tag = _module_tag(request)
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env=module_env)
    try:
        cluster.start_edges([f"{tag}-a", f"{tag}-b"])
        cluster.start_relay(f"{tag}-relay")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(module_cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, checked alive, with its edges registered."""
    for proc in [*module_cluster.edges, *module_cluster.relays]:
        assert proc.alive(), f"{proc.name} died: {proc.log()[-3000:]}"
    module_cluster.register_edges()
    yield module_cluster


@pytest.fixture
def own_cluster(module_env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    """An empty cluster for one test; the test starts what it needs; all stopped after it."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    cluster = Cluster(log_dir=log_dir, env=module_env)
    try:
        yield cluster
    finally:
        cluster.stop()
