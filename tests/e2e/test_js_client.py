"""The JavaScript peer SDK (clients/js) in Node against a real ``serve`` and a real two-edge
cluster: events published from Python arrive once and in order, and a resuming client loses
nothing when its edge is killed and restarted, or drained with 4001.

The Node peer (clients/js/test/integration/peer.mjs) prints one JSON line per item; the test
reads them from its log. Between the peer and the edges sits a TCP proxy whose target the test
switches, so "the peer reconnects to the other edge" is a fact of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from harness import procs, waits
from harness.cluster import Cluster
from harness.data import events, make_tenant, make_token, orm, publish_many, stream_key, wait_assigned
from harness.env import child_env
from harness.procs import Proc

pytestmark = pytest.mark.e2e

PEER = procs.ROOT / "clients" / "js" / "test" / "integration" / "peer.mjs"
# Bound on waits for the Node peer (seconds).
PEER_TIMEOUT_SECS = 20.0


def node() -> str:
    path = shutil.which("node")
    assert path is not None, "node is required for the JavaScript client's tests"
    return path


class NodePeer:
    """The Node peer process and the JSON lines it printed."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    @classmethod
    def start(cls, cluster: Cluster, name: str, url: str, token: str) -> NodePeer:
        args = [node(), "--experimental-websocket", "--no-warnings", str(PEER), url]
        return cls(cluster.spawn(name, args, env={"TYRUM_TOKEN": token}))

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.proc.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def events(self) -> list[dict[str, Any]]:
        return [line["event"] for line in self.lines() if "event" in line]

    def statuses(self) -> list[str]:
        return [line["status"] for line in self.lines() if "status" in line]

    async def until(self, predicate: Any, what: str, timeout: float = PEER_TIMEOUT_SECS) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            errors = [line for line in self.lines() if "error" in line]
            assert not errors, f"the Node peer ended with {errors}"
            assert self.proc.alive(), f"the Node peer exited: {self.proc.log()[-2000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.proc.log()[-2000:]}"
            await asyncio.sleep(0.05)

    async def until_events(self, n: int) -> list[dict[str, Any]]:
        await self.until(lambda p: len(p.events()) >= n, f"{n} events")
        return self.events()

    async def until_live(self, times: int = 1) -> None:
        await self.until(lambda p: p.statuses().count("live") >= times, f"live #{times}")

    def stop(self) -> None:
        self.proc.stop(timeout=5)


class SwitchProxy:
    """A TCP pass-through on 127.0.0.1 to one edge at a time; ``target`` can be switched."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = waits.free_port()
        self.server: asyncio.Server | None = None

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


def ids_and_offsets(items: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["eventId"], e["offset"]) for e in items]


async def test_js_client__python_events_arrive_once_and_in_order(cluster: Cluster) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    peer = NodePeer.start(cluster, "node-order", cluster.urls[0], token)
    try:
        await peer.until_live()
        published = await orm(publish_many, tenant, events(30, "run.updated", device="dev-1"))
        got = await peer.until_events(30)
        assert ids_and_offsets(got) == [(eid, i + 1) for i, eid in enumerate(published)]
        assert {e["stream"] for e in got} == {"device"}
        assert [e["payload"] for e in got] == [{"i": i} for i in range(30)]
        assert not any(e["replayed"] for e in got)
        await asyncio.sleep(0.5)  # nothing more arrives: no repeats
        assert len(peer.events()) == 30
    finally:
        peer.stop()
    assert token not in peer.proc.log()


async def test_js_client__edge_killed_and_restarted_loses_nothing(cluster: Cluster) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    key = await orm(stream_key, tenant, "device")
    peer = NodePeer.start(cluster, "node-kill", cluster.urls[1], token)
    try:
        await peer.until_live()
        before = await orm(publish_many, tenant, events(5, "before", device="dev-1"))
        await peer.until_events(5)
        cluster.kill_edge(1)
        during = await orm(publish_many, tenant, events(7, "during", device="dev-1"))
        await wait_assigned(key, 12)
        cluster.restart_edge(1)
        await peer.until_live(2)
        after = await orm(publish_many, tenant, events(3, "after", device="dev-1"))
        got = await peer.until_events(15)
        assert ids_and_offsets(got) == [(eid, i + 1) for i, eid in enumerate(before + during + after)]
        assert [e["replayed"] for e in got[5:12]] == [True] * 7
        await asyncio.sleep(0.5)
        assert len(peer.events()) == 15
    finally:
        peer.stop()


async def test_js_client__drain_4001_resumes_on_the_other_edge(cluster: Cluster) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    key = await orm(stream_key, tenant, "device")
    proxy = SwitchProxy(cluster.ports[0])
    await proxy.open()
    peer = NodePeer.start(cluster, "node-drain", proxy.url, token)
    try:
        await peer.until_live()
        first = await orm(publish_many, tenant, events(4, "first", device="dev-1"))
        await peer.until_events(4)
        proxy.target = cluster.ports[1]  # new connections go to the other edge
        await asyncio.to_thread(procs.manage, "edge_command", "drain", "--edge", cluster.edge_ids[0], env=cluster.env)
        second = await orm(publish_many, tenant, events(6, "second", device="dev-1"))
        await wait_assigned(key, 10)
        await peer.until_live(2)
        got = await peer.until_events(10)
        assert ids_and_offsets(got) == [(eid, i + 1) for i, eid in enumerate(first + second)]
        await asyncio.sleep(0.5)
        assert len(peer.events()) == 10
    finally:
        peer.stop()
        await proxy.close()
        cluster.restart_edge(0)  # the drained edge refuses new sockets: give the module a fresh one


def assigned(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute(
                "SELECT count(*) FROM backplane_outboxitem WHERE stream_offset IS NOT NULL AND kind = 'event'"
            ).fetchone()[0]
        )


async def test_js_client__embedded_serve_delivers_and_resumes_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "embedded.sqlite3"
    env = child_env(DATABASE_URL=f"sqlite:///{db}", REDIS_URL="")

    def manage(*args: str) -> str:
        return procs.manage(*args, env=env)

    def publish(n: int) -> str:
        return (
            manage(
                "publish_event",
                "--tenant",
                "js-co",
                "--type",
                "run.updated",
                "--payload",
                json.dumps({"n": n}),
                "--device",
                "dev-1",
            )
            .strip()
            .splitlines()[-1]
        )

    manage("migrate", "--no-input", "-v", "0")
    manage("create_tenant", "JS Co")
    token = manage("create_token", "--tenant", "js-co", "--device", "dev-1", "--role", "client").splitlines()[-1]
    port = waits.free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    cluster = Cluster(log_dir=log_dir, env=env)

    def start_serve() -> None:
        cluster.others.append(Proc("serve", [procs.PYTHON, "manage.py", "serve", "--port", str(port)], env, log_dir))
        waits.wait_port(port, timeout=30)

    try:
        start_serve()
        peer = NodePeer.start(cluster, "node-embedded", f"ws://127.0.0.1:{port}/ws", token)
        await peer.until_live()
        first = [await asyncio.to_thread(publish, n) for n in (1, 2)]
        await peer.until_events(2)
        serve = cluster.others[0]
        serve.stop()
        cluster.others.remove(serve)
        missed = [await asyncio.to_thread(publish, n) for n in (3, 4, 5)]
        start_serve()
        deadline = time.monotonic() + 10  # serve's relay polls for other processes' rows
        while assigned(db) < 5:
            assert time.monotonic() < deadline, "serve did not assign the new events"
            await asyncio.sleep(0.1)
        got = await peer.until_events(5)
        assert ids_and_offsets(got) == [(eid, i + 1) for i, eid in enumerate(first + missed)]
        await asyncio.sleep(0.5)
        assert len(peer.events()) == 5
    finally:
        cluster.stop()
