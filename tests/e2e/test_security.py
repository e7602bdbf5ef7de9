"""Issue 13 on the wire, where it takes daphne: the WebSocket layer's inbound cap (nothing
larger is buffered; close 4009), pings spend the inbound budget (4029), request headers have
a deadline, the access log keeps no query string, ``Host`` and paths are checked with their
HTTP statuses, and a cluster edge or relay refuses the development SECRET_KEY."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time

import pytest
from websockets.asyncio.client import connect

from harness import waits
from harness.cluster import Cluster
from harness.data import make_tenant, make_token, orm
from harness.peer import PROTOCOL
from harness.procs import PYTHON, ROOT, relay_args

pytestmark = pytest.mark.e2e

# Settings of this module's edges: a small header deadline, a short ping budget.
EDGE_ENV = {
    "BACKPLANE_REQUEST_HEADER_TIMEOUT_SECS": "1.5",
    "BACKPLANE_INBOUND_BURST": "5",
    "BACKPLANE_INBOUND_RATE_PER_SEC": "1",
}


@pytest.fixture(scope="module")
def module_cluster(module_env, tmp_path_factory):  # type: ignore[no-untyped-def]
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env={**module_env, **EDGE_ENV})
    try:
        cluster.start_edges([f"e2e-security-{os.getpid()}"])
        yield cluster
    finally:
        cluster.stop()


def port_of(cluster: Cluster) -> int:
    return cluster.ports[0]


def raw_request(port: int, lines: list[str], timeout: float = 5.0) -> bytes:
    """Send an HTTP request by hand; return what the server answered (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and b"\r\n\r\n" not in out:
            chunk = sock.recv(4096)
            if not chunk:
                break
            out += chunk
        return out


def upgrade(path: str, host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        f"Sec-WebSocket-Protocol: {PROTOCOL}",
        *extra,
    ]


async def test_upgrade__bad_host_400_unknown_path_404_and_no_traceback(cluster) -> None:
    token = await orm(make_token, await orm(make_tenant), "dev-s")
    auth = (f"Authorization: Bearer {token}",)
    port = port_of(cluster)
    assert raw_request(port, upgrade("/ws", host="evil.example", extra=auth)).startswith(b"HTTP/1.1 400")
    assert raw_request(port, upgrade("/nope", extra=auth)).startswith(b"HTTP/1.1 404")
    assert raw_request(port, upgrade("/ws", extra=auth)).startswith(b"HTTP/1.1 101")
    log = cluster.edges[0].log()
    assert "Traceback" not in log and "No route found" not in log


async def test_access_log__keeps_no_query_string(cluster) -> None:
    port = port_of(cluster)
    raw_request(port, ["GET /ws?token=SEKRET-QUERY-1 HTTP/1.1", "Host: 127.0.0.1", "Connection: close"])
    raw_request(port, upgrade("/ws?access_token=SEKRET-QUERY-2;x=1"))
    log_path = cluster.edges[0].log_path
    waits.wait_for(lambda: log_path.read_text().count('"GET /ws"') >= 1, timeout=5, what="the access log line")
    log = cluster.edges[0].log()
    assert "SEKRET-QUERY" not in log
    assert '"GET /ws"' in log and "WSCONNECTING /ws" in log


async def test_inbound_cap__the_websocket_layer_closes_4009_before_the_frame_is_in(cluster) -> None:
    """A frame announcing 200 KiB (over the 64 KiB cap, under daphne's own 1 MiB) is refused
    from its header: the server does not wait for (or buffer) the rest, and closes with 4009
    instead of dropping the connection."""
    token = await orm(make_token, await orm(make_tenant), "dev-big")
    port = port_of(cluster)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(upgrade("/ws", extra=(f"Authorization: Bearer {token}",))) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        size = 200 * 1024
        mask = b"\x01\x02\x03\x04"
        sock.sendall(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", size) + mask + b"x" * (100 * 1024))
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
        close = data.find(b"\x88")
        assert close >= 0, f"no close frame came back: {data[:200]!r}"
        code = struct.unpack("!H", data[close + 2 : close + 4])[0]
        assert code == 4009


async def test_pings__a_ping_flood_closes_4029(cluster) -> None:
    token = await orm(make_token, await orm(make_tenant), "dev-ping")
    async with connect(
        cluster.urls[0], subprotocols=[PROTOCOL], additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await asyncio.wait_for(ws.recv(), 5)  # hello
        for _ in range(20):  # the burst is 5, refilled at 1/s
            try:
                await ws.ping()
            except Exception:
                break
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except Exception:
            pass
        assert ws.close_code == 4029


async def test_headers__a_client_trickling_its_request_headers_is_cut(cluster) -> None:
    port = port_of(cluster)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        cut = None
        for n in range(40):  # a header byte every 0.2 s, for at most 8 s (the deadline is 1.5 s)
            try:
                sock.sendall(b"X-Slow-%d: x\r\n" % n)
                sock.settimeout(0.2)
                if sock.recv(1) == b"":
                    cut = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                cut = time.monotonic() - started
                break
        assert cut is not None, "still connected after 8 s of trickled headers"
        assert cut < 6


def test_secret_key__cluster_edge_and_relay_refuse_the_development_key(module_env, tmp_path) -> None:
    from backplane.conf import DEVELOPMENT_SECRET_KEY

    env = {**module_env, "SECRET_KEY": DEVELOPMENT_SECRET_KEY, "DEBUG": "0"}
    port = waits.free_port()
    edge = subprocess.run(
        [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tyrum.asgi:application"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert edge.returncode != 0
    assert "refusing to start an edge of a cluster on the development SECRET_KEY" in edge.stderr
    relay = subprocess.run(relay_args("--once"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert relay.returncode != 0
    assert "development SECRET_KEY" in relay.stderr


async def test_headers__the_deadline_spares_a_websocket_and_a_keep_alive_client(cluster) -> None:
    """The request-header deadline (1.5 s here) never cuts a socket that became a WebSocket,
    nor a keep-alive connection whose next request came in time."""
    token = await orm(make_token, await orm(make_tenant), "dev-long")
    async with connect(
        cluster.urls[0], subprotocols=[PROTOCOL], additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await asyncio.wait_for(ws.recv(), 5)  # hello
        await asyncio.sleep(3.5)  # past two deadlines
        await ws.send('{"type":"ping"}')
        assert "pong" in await asyncio.wait_for(ws.recv(), 5)
    port = port_of(cluster)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(3):  # three requests on one connection, 1 s apart (each within the deadline)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                assert chunk, "the keep-alive connection was cut"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 ")
            time.sleep(1.0)
