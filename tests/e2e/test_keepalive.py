"""WebSocket pings on a real daphne edge, answered by a raw client (docs/decisions/0033): the
pong that answers a ping is taken on the edge's fast path (backplane/vendor/keepalive.py),
everything else by autobahn's frame parser, and a peer that does not answer is closed after
the ping timeout. The edge pings every second and waits 2 s for a pong."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness import waits
from harness.cluster import Cluster
from harness.data import make_tenant, make_token, orm
from harness.peer import PROTOCOL
from harness.procs import Proc, daphne_args

pytestmark = pytest.mark.e2e

PING, PONG, TEXT, BINARY, CLOSE = 9, 10, 1, 2, 8
WAIT = 15.0  # bound on any wait below (the edge acts within ~3 s)


@pytest.fixture(scope="module")
def edge_port(module_env: dict[str, str], tmp_path_factory: Any) -> Any:
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env=module_env)
    port = waits.free_port()
    args = daphne_args(port, ping_interval=1)
    args[-1:-1] = ["--ping-timeout", "2"]
    proc = Proc("e2e-keepalive", args, {**module_env, "EDGE_ID": "e2e-keepalive"}, cluster.log_dir)
    cluster.edges.append(proc)
    cluster.ports.append(port)
    try:
        waits.wait_port(port, timeout=30)
        yield port
    finally:
        cluster.stop()


def masked(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One client frame (RFC 6455 5.3), payload under 126 bytes."""
    mask = mask or os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + body


class RawPeer:
    """A WebSocket client written by hand: each ``write`` is one ``send()``, and nothing is
    answered unless the test does it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, token: str) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {PROTOCOL}\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        peer = cls(reader, writer)
        assert json.loads((await peer.until(TEXT))[1])["type"] == "hello"
        return peer

    async def frame(self) -> tuple[int, bytes] | None:
        """The next frame from the edge, or None when the connection ended."""
        try:
            b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), WAIT)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def until(self, *opcodes: int) -> tuple[int, bytes]:
        while True:
            got = await self.frame()
            assert got is not None, f"closed while waiting for opcode {opcodes}"
            if got[0] in opcodes:
                return got

    async def write(self, *chunks: bytes) -> None:
        """Each chunk in its own ``send()``, apart enough to reach the edge in its own read."""
        for i, chunk in enumerate(chunks):
            if i:
                await asyncio.sleep(0.1)
            self.writer.write(chunk)
            await self.writer.drain()

    async def end(self, *, answering: bool = False) -> int:
        """Read until the connection ends (``answering`` each ping meanwhile): the close code
        the edge sent, 1006 for none."""
        code, until = 1006, asyncio.get_running_loop().time() + WAIT
        while (got := await self.frame()) is not None:
            assert asyncio.get_running_loop().time() < until, "still open"
            if got[0] == CLOSE:
                code = struct.unpack(">H", got[1][:2])[0] if len(got[1]) >= 2 else 1005
            elif got[0] == PING and answering:
                await self.write(masked(PONG, got[1]))
        return code

    def close(self) -> None:
        self.writer.transport.abort()


@pytest.fixture
async def raw(edge_port: int) -> AsyncIterator[Any]:
    opened: list[RawPeer] = []

    async def open_peer() -> RawPeer:
        tenant = await orm(make_tenant)
        peer = await RawPeer.open(edge_port, await orm(make_token, tenant, "dev-1", "client"))
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        peer.close()


async def _converse(peer: RawPeer, answer: Any, pings: int, texts: int = 0) -> list[Any]:
    """Answer the next ``pings`` pings with the writes ``answer(payload)`` returns (later ones
    with a plain pong) until ``texts`` text frames came too; return those."""
    seen: list[Any] = []
    while pings > 0 or len(seen) < texts:
        opcode, payload = await peer.until(PING, TEXT)
        if opcode == TEXT:
            seen.append(json.loads(payload))
        elif pings > 0:
            pings -= 1
            await peer.write(*answer(payload))
        else:
            await peer.write(masked(PONG, payload))
    return seen


def _pong(payload: bytes) -> list[bytes]:
    return [masked(PONG, payload)]


async def test_keepalive__a_pong_answering_each_ping_keeps_the_socket_open(raw) -> None:
    """Pongs on the fast path answer the pings: still open after twice the ping timeout."""
    peer = await raw()
    assert await _converse(peer, _pong, 5) == []
    await peer.write(masked(TEXT, b'{"type": "ping"}'))  # and the peer's own ping still works
    assert await _converse(peer, _pong, 0, texts=1) == [{"type": "pong"}]


async def test_keepalive__no_pong_closes_the_socket_after_the_ping_timeout(raw) -> None:
    peer = await raw()
    await peer.until(PING)
    assert await peer.end() == 1006  # dropped, as autobahn's ping timeout does


async def test_keepalive__a_pong_with_another_payload_does_not_answer_the_ping(raw) -> None:
    peer = await raw()
    _, payload = await peer.until(PING)
    await peer.write(masked(PONG, bytes([payload[0] ^ 1]) + payload[1:]))
    assert await peer.end(answering=True) == 1006  # the first ping's timeout, whatever follows


async def test_keepalive__a_pong_split_over_reads_or_sharing_one_goes_through_autobahn(raw) -> None:
    """A pong in two reads, then a pong and the peer's own ping in one read: both answer
    their pings (autobahn's parser) and the ping in the same read is answered too."""
    peer = await raw()
    assert await _converse(peer, lambda payload: [(f := masked(PONG, payload))[:3], f[3:]], 2) == []
    with_ping = await _converse(peer, lambda p: [masked(PONG, p) + masked(TEXT, b'{"type": "ping"}')], 2, texts=2)
    assert with_ping == [{"type": "pong"}] * 2
    assert await _converse(peer, _pong, 2) == []  # still open past the timeout


async def test_keepalive__bytes_that_look_like_the_pong_inside_a_frame_belong_to_the_frame(raw) -> None:
    """The 18 bytes of a pong answering the ping, read alone but as the payload of a binary
    frame whose header came first: the frame's (the edge closes 4400 for a binary frame), not
    a pong."""
    peer = await raw()
    _, payload = await peer.until(PING)
    pong = masked(PONG, payload)
    frame = masked(BINARY, pong, mask=b"\x00\x00\x00\x00")  # its payload on the wire is the pong
    await peer.write(frame[:6], frame[6:])
    assert await peer.end() == 4400
