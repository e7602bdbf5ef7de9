"""Unit tests of the edge's write coalescing: the frames written directly to a socket in one
loop turn go out together, in order, at the end of the turn; a flush sends them at once."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from backplane.vendor import daphne as vendor_daphne


class Transport:
    """The parts of a twisted TCP transport the coalescer touches."""

    TLS = False  # twisted's, until a connection starts TLS

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.disconnected = False
        self.disconnecting = False
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.written: list[bytes] = []  # what went through twisted's buffered write

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Proto:
    STATE_OPEN = 1

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.state = self.STATE_OPEN


@pytest.fixture(autouse=True)
def plain_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The double stands for twisted's plain TCP connection (sent to with send() directly)."""
    monkeypatch.setattr(vendor_daphne, "PLAIN_TCP", Transport)
    monkeypatch.setattr(vendor_daphne, "_FileDescriptor", Transport)


def pair() -> tuple[socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.settimeout(1)
    return ours, peer


def readable(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""
    finally:
        sock.settimeout(1)


async def test_coalescer__frames_of_one_turn_go_at_its_end_in_order_in_one_send() -> None:
    ours, peer = pair()
    try:
        proto = Proto(Transport(ours))
        c = vendor_daphne.Coalescer(asyncio.get_running_loop())
        for frame in (b"one", b"two", b"three"):
            c.write(proto, frame)
        assert readable(peer) == b""  # nothing before the turn ends
        await asyncio.sleep(0)
        assert peer.recv(65536) == b"onetwothree"
        assert proto.transport.written == []  # straight to the socket, not through twisted
    finally:
        ours.close()
        peer.close()


async def test_coalescer__flush_sends_a_sockets_frames_now_and_only_once() -> None:
    ours, peer = pair()
    try:
        proto = Proto(Transport(ours))
        c = vendor_daphne.Coalescer(asyncio.get_running_loop())
        c.write(proto, b"first")
        c.flush(proto)  # an ASGI send (a pong, a close) is about to follow: it must not overtake
        assert peer.recv(65536) == b"first"
        await asyncio.sleep(0)
        assert readable(peer) == b""
    finally:
        ours.close()
        peer.close()


async def test_coalescer__behind_bytes_twisted_holds_it_queues_after_them() -> None:
    ours, peer = pair()
    try:
        transport = Transport(ours)
        transport.dataBuffer = b"unsent"  # twisted has bytes waiting: ours go behind them
        proto = Proto(transport)
        c = vendor_daphne.Coalescer(asyncio.get_running_loop())
        c.write(proto, b"a")
        c.write(proto, b"b")
        await asyncio.sleep(0)
        assert transport.written == [b"ab"]
        assert readable(peer) == b""
    finally:
        ours.close()
        peer.close()


async def test_coalescer__a_closed_transport_gets_nothing() -> None:
    ours, peer = pair()
    try:
        transport: Any = Transport(ours)
        transport.disconnecting = True
        c = vendor_daphne.Coalescer(asyncio.get_running_loop())
        c.write(Proto(transport), b"late")
        await asyncio.sleep(0)
        assert transport.written == [] and readable(peer) == b""
    finally:
        ours.close()
        peer.close()


async def test_coalescer__a_socket_no_longer_open_gets_nothing_after_its_close() -> None:
    ours, peer = pair()
    try:
        proto = Proto(Transport(ours))
        c = vendor_daphne.Coalescer(asyncio.get_running_loop())
        c.write(proto, b"after-close")
        proto.state = 3  # autobahn wrote a close frame this turn: nothing may follow it
        await asyncio.sleep(0)
        assert readable(peer) == b"" and proto.transport.written == []
    finally:
        ours.close()
        peer.close()


async def test_coalescer__holds_at_most_flush_bytes_per_socket_and_counts_them(monkeypatch) -> None:
    ours, peer = pair()
    try:
        monkeypatch.setattr(vendor_daphne.Coalescer, "FLUSH_BYTES", 10)
        proto = Proto(Transport(ours))
        c = vendor_daphne.Coalescer(asyncio.get_running_loop())
        c.write(proto, b"abcd")
        assert c.held(proto) == 4  # counted towards the slow-consumer bound
        c.write(proto, b"efgh")
        c.write(proto, b"ijkl")  # past 10 bytes: out now, not at the end of the turn
        assert peer.recv(65536) == b"abcdefghijkl" and c.held(proto) == 0
    finally:
        ours.close()
        peer.close()


async def test_send_now__anything_but_plain_tcp_goes_through_transport_write(monkeypatch) -> None:
    """twisted's TLS wrapper passes the raw socket's attributes through: writing to that
    socket would send the frame unencrypted. Only a plain TCP connection gets send()."""
    monkeypatch.setattr(vendor_daphne, "PLAIN_TCP", ())
    ours, peer = pair()
    try:
        transport = Transport(ours)
        vendor_daphne.send_now(transport, b"secret frame")
        assert transport.written == [b"secret frame"] and readable(peer) == b""
    finally:
        ours.close()
        peer.close()
