"""The project's Python peer SDK (``backplane.client.TyrumClient``) against a real cluster.

Between the client and its edge sits a small TCP proxy that the test can cut, so "the peer
was away while events were published" is a fact of the test, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from backplane.client import Event, Refused, TokenRevoked, TyrumClient
from backplane.models import AccessToken
from backplane.tokens import hash_token
from harness import procs, waits
from harness.data import make_tenant, make_token, orm, publish_many, stream_key, wait_assigned

pytestmark = pytest.mark.e2e


class Proxy:
    """A TCP pass-through on 127.0.0.1 that can be cut (connections dropped, new ones refused)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = waits.free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


class Run:
    """Iterate ``client.events()`` in a task, collecting what it yields (or raises)."""

    def __init__(self, client: TyrumClient) -> None:
        self.client = client
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for item in self.client.events():
                self.items.append(item)
        except Exception as exc:
            self.error = exc

    @property
    def events(self) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event)]

    async def until(self, done: Callable[[Run], bool], timeout: float = 10.0, what: str = "items") -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            if self.task.done():
                raise AssertionError(f"events() ended while waiting for {what}: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; got {self.items[-5:]}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def proxy(cluster) -> AsyncIterator[Proxy]:
    p = Proxy(cluster.ports[0])
    await p.open()
    yield p
    await p.cut()


@contextlib.asynccontextmanager
async def running(client: TyrumClient) -> AsyncIterator[Run]:
    run = Run(client)
    try:
        await run.until(lambda r: r.client.connection_id is not None, what="hello")
        yield run
    finally:
        await run.stop()


def device_events(n: int, kind: str = "sdk") -> list[dict[str, Any]]:
    return [{"type": kind, "payload": {"i": i}, "device": "dev-1"} for i in range(n)]


async def test_tyrum_client__yields_events_in_order(cluster) -> None:
    tenant = await orm(make_tenant)
    client = TyrumClient(cluster.urls[1], await orm(make_token, tenant, "dev-1"), auth="subprotocol")
    async with running(client) as run:
        ids = await orm(publish_many, tenant, device_events(3) + [{"type": "wide", "payload": {"w": 1}}])
        await run.until(lambda r: len(r.events) == 4, what="4 events")
        assert sorted(e.event_id for e in run.events) == sorted(ids)
        device = [e for e in run.events if e.stream == "device"]
        assert [(e.offset, e.payload, e.replayed) for e in device] == [(i + 1, {"i": i}, False) for i in range(3)]
        assert client.state()["device"]["offset"] == 3


async def test_tyrum_client__reconnects_and_resumes_what_it_missed(cluster, proxy) -> None:
    tenant = await orm(make_tenant)
    client = TyrumClient(proxy.url, await orm(make_token, tenant, "dev-1"), backoff_initial=0.2, backoff_max=0.5)
    async with running(client) as run:
        first = await orm(publish_many, tenant, device_events(3))
        await run.until(lambda r: len(r.events) == 3, what="3 events")
        await proxy.cut()  # the network goes away...
        await client.drop_connection()
        missed = await orm(publish_many, tenant, device_events(4, "missed"))
        await wait_assigned(stream_key(tenant, "device"), 7)
        await asyncio.sleep(0.5)  # a few failed reconnects
        await proxy.open()  # ...and comes back
        await run.until(lambda r: len(r.events) == 7, what="the missed events")
        later = await orm(publish_many, tenant, device_events(2, "later"))
        await run.until(lambda r: len(r.events) == 9, what="live events after the resume")
        assert [e.event_id for e in run.events] == first + missed + later  # nothing lost, nothing twice
        assert [e.offset for e in run.events] == list(range(1, 10))
        assert [e.replayed for e in run.events] == [False] * 3 + [True] * 4 + [False] * 2
        assert client.reconnects == 1
        assert client.last_resumed is not None and client.last_resumed["device"] == {"recovered": True,
                                                                                    "replayed": 4}
        assert client.duplicates == 0


async def test_tyrum_client__counts_replayed_duplicates_without_yielding_them(cluster, proxy) -> None:
    tenant = await orm(make_tenant)
    client = TyrumClient(proxy.url, await orm(make_token, tenant, "dev-1"), backoff_initial=0.1, backoff_max=0.2)
    async with running(client) as run:
        ids = await orm(publish_many, tenant, device_events(5))
        await run.until(lambda r: len(r.events) == 5, what="5 events")
        stale = client.state()
        stale["device"]["offset"] = 2  # e.g. state persisted a while ago
        client.load_state(stale)
        await client.drop_connection()
        await run.until(lambda r: r.client.duplicates == 3, what="3 duplicates")
        assert client.last_resumed is not None and client.last_resumed["device"] == {"recovered": True,
                                                                                    "replayed": 3}
        ids += await orm(publish_many, tenant, device_events(1, "next"))
        await run.until(lambda r: len(r.events) == 6, what="the next event")
        assert [e.event_id for e in run.events] == ids
        assert [e.offset for e in run.events] == [1, 2, 3, 4, 5, 6]


async def test_tyrum_client__revocation_raises_token_revoked(cluster) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    run = Run(TyrumClient(cluster.urls[0], token))
    try:
        await run.until(lambda r: r.client.connection_id is not None, what="hello")
        revoked = await orm(lambda: str(AccessToken.objects.get(token_hash=hash_token(token)).id))
        await asyncio.to_thread(procs.manage, "revoke_token", revoked, env=cluster.env)
        await asyncio.wait_for(run.task, 10)
        assert isinstance(run.error, TokenRevoked), run.error
    finally:
        await run.stop()


async def test_tyrum_client__unknown_token_raises_refused(cluster) -> None:
    run = Run(TyrumClient(cluster.urls[1], "tyr_not-a-token", max_attempts=3, backoff_max=0.2))
    try:
        await asyncio.wait_for(run.task, 10)
        assert isinstance(run.error, Refused), run.error
        assert "403" in str(run.error)
    finally:
        await run.stop()
