"""Pins on the third-party internals backplane/vendor relies on: each test fails when a new
version of daphne, twisted, autobahn, channels or channels-redis renames or drops what the
edge or the relay reads or patches (instead of the edge silently reading a default)."""

from __future__ import annotations

import asyncio
import importlib
import socket
from typing import Any

import pytest

from backplane.vendor import channels as vendor_channels
from backplane.vendor import channels_redis as vendor_redis
from backplane.vendor import daphne as vendor_daphne


@pytest.mark.parametrize("module,cls,attr", [*vendor_daphne.RELIED_ON, *vendor_redis.RELIED_ON])
def test_vendor__class_attribute_relied_on_exists(module: str, cls: str, attr: str) -> None:
    assert hasattr(getattr(importlib.import_module(module), cls), attr), f"{module}.{cls}.{attr} is gone"


def test_vendor__twisted_tcp_connection_has_the_write_buffer_and_socket() -> None:
    from twisted.internet import reactor, tcp

    ours, peer = socket.socketpair()
    try:
        conn = tcp.Connection(ours, None, reactor)
        for attr in ("socket", "dataBuffer", "offset", "_tempDataLen", "disconnected", "disconnecting"):
            assert hasattr(conn, attr), f"twisted's TCP connection has no {attr}"
        assert isinstance(conn, vendor_daphne.PLAIN_TCP)
        assert vendor_daphne.outbound_buffered(conn) == 0
        conn._tempDataLen = 5  # what twisted counts before joining its temporary buffers
        conn.dataBuffer, conn.offset = b"0123456789", 4
        assert vendor_daphne.outbound_buffered(conn) == 11
    finally:
        ours.close()
        peer.close()


def daphne_protocol() -> Any:
    """daphne's WebSocket protocol object, connected to a string transport (as autobahn sets
    it up on a new TCP connection)."""
    from daphne.ws_protocol import WebSocketFactory
    from twisted.internet.testing import StringTransport

    class Server:
        connections: dict[Any, Any] = {}

    factory = WebSocketFactory(Server)
    proto = factory.buildProtocol(("127.0.0.1", 0))
    proto.makeConnection(StringTransport())
    return proto


def test_vendor__daphne_protocol_instance_state_relied_on_exists() -> None:
    proto = daphne_protocol()
    for attr in ("state", "send_state", "data", "transport", "_perMessageCompress", "closeHandshakeTimeout"):
        assert hasattr(proto, attr), f"daphne's protocol object has no {attr}"
    # backplane/vendor/keepalive.py: autobahn's auto-ping state (read by its pong path too).
    pinging = ("autoPingPending", "autoPingPendingSent", "autoPingPendingSeq", "autoPingTimeoutCall", "autoPingTimeout")
    for attr in pinging:
        assert hasattr(proto, attr), f"daphne's protocol object has no {attr}"
    assert proto.autoPingSize == 12  # its payload has no random part: keepalive's is the same
    assert proto.send_state == proto.SEND_STATE_GROUND
    assert proto.data == b""
    assert vendor_daphne.direct_wire(proto) is proto  # no compression negotiated
    proto._perMessageCompress = object()
    assert vendor_daphne.direct_wire(proto) is None


def test_vendor__daphne_protocol_is_behind_the_asgi_send() -> None:
    import functools
    import inspect

    from daphne.server import Server

    # daphne hands the application ``send=partial(self.handle_reply, protocol)``.
    assert "send=partial(self.handle_reply, protocol)" in inspect.getsource(Server.create_application)
    proto = daphne_protocol()
    server = Server.__new__(Server)
    assert vendor_daphne.protocol_of(functools.partial(server.handle_reply, proto)) is proto
    assert vendor_daphne.protocol_of(lambda message: None) is None


def test_vendor__daphne_server_connections_say_when_a_peer_is_gone() -> None:
    from daphne.server import Server

    proto = daphne_protocol()
    server = Server.__new__(Server)
    server.connections = {}
    proto.server = server
    assert vendor_daphne.gone(proto)  # not registered: dropped
    server.protocol_connected(proto)
    assert not vendor_daphne.gone(proto)
    server.protocol_disconnected(proto)
    assert vendor_daphne.gone(proto)


def test_vendor__daphne_application_queue_is_set_when_the_application_starts() -> None:
    import inspect

    from daphne.ws_protocol import WebSocketProtocol

    # frame_pending() reads proto.application_queue; daphne sets it here.
    assert "self.application_queue = application_queue" in inspect.getsource(WebSocketProtocol.applicationCreateWorked)
    assert "self.handshake_deferred" in inspect.getsource(WebSocketProtocol.onConnect)


def test_vendor__denial_response_patch_installs_once_and_keeps_daphnes_reply() -> None:
    from daphne.ws_protocol import WebSocketProtocol

    vendor_daphne.install_denial_response()
    patched = WebSocketProtocol.handle_reply
    vendor_daphne.install_denial_response()
    assert WebSocketProtocol.handle_reply is patched
    assert WebSocketProtocol._tyrum_denial is True


def test_vendor__channels_gives_no_layer_for_an_unconfigured_alias() -> None:
    from channels.layers import get_channel_layer

    assert get_channel_layer(vendor_channels.NO_LAYER_ALIAS) is None
    assert vendor_channels.get_handler_name({"type": "websocket.receive"}) == "websocket_receive"


async def test_vendor__pubsub_publisher_writes_what_group_send_writes() -> None:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    layer = RedisPubSubChannelLayer(hosts=["redis://127.0.0.1:6379"], prefix="pin")
    loop_layer = layer._get_layer()
    assert len(loop_layer._shards) == 1
    channel = loop_layer._get_group_channel_name("g")
    assert isinstance(channel, str) and "g" in channel
    message = {"type": "bp.batch", "items": []}
    assert layer.deserialize(layer.serialize(message)) == message
    publisher = vendor_redis.PubSubPublisher.for_layer(layer, "redis://127.0.0.1:6379", 1.0)
    assert publisher is not None
    await publisher.aclose()
    assert vendor_redis.PubSubPublisher.for_layer(object(), "redis://127.0.0.1:6379", 1.0) is None
    await asyncio.sleep(0)


async def test_vendor__wire_publisher_only_for_plain_urls_and_replies_go_to_their_caller_in_order() -> None:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    layer = RedisPubSubChannelLayer(hosts=["redis://127.0.0.1:6379"], prefix="pin")
    assert (
        type(vendor_redis.PubSubPublisher.for_layer(layer, "redis://127.0.0.1:6379", 1.0)) is vendor_redis.WirePublisher
    )
    tls = vendor_redis.PubSubPublisher.for_layer(layer, "rediss://127.0.0.1:6379", 1.0)
    assert type(tls) is vendor_redis.PubSubPublisher  # redis-py speaks TLS; the wire does not
    await tls.aclose()

    loop = asyncio.get_running_loop()
    replies = vendor_redis._Replies()
    given_up, second, third = loop.create_future(), loop.create_future(), loop.create_future()
    replies.waiting.extend([(given_up, 2, []), (second, 1, []), (third, 2, [])])
    given_up.cancel()  # its caller timed out: its replies are still its own
    replies.data_received(b":1\r\n:")
    replies.data_received(b"2\r\n:3")
    assert not second.done()
    replies.data_received(b"\r\n-ERR no\r\n")
    assert second.result() == [3]
    assert not third.done()
    replies.connection_lost(None)  # the rest fail: their callers drop the connection
    with pytest.raises(ConnectionResetError):
        third.result()
    assert replies.lost
    assert vendor_redis._publish_command(b"ch", b"\x00d") == b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$2\r\n\x00d\r\n"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_ws_text_frame__matches_a_websocket_library_server_frame(size: int) -> None:
    from websockets.frames import Frame, Opcode

    text = ("é" * size)[:size] if size % 2 else "a" * size
    assert vendor_daphne.ws_text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


def test_vendor__autobahn_reads_the_limits_relied_on_from_the_protocol_class() -> None:
    """install_limits sets these as class attributes of daphne's protocol: autobahn copies a
    factory option only onto a protocol that does not have it already."""
    import inspect

    from autobahn.websocket.protocol import WebSocketProtocol
    from daphne.ws_protocol import WebSocketProtocol as DaphneProtocol

    for name in ("failByDrop", "maxMessagePayloadSize", "maxFramePayloadSize"):
        assert name in DaphneProtocol.CONFIG_ATTRS
    assert "if not hasattr(self, configAttr):" in inspect.getsource(WebSocketProtocol._connectionMade)
    assert "_max_message_size_exceeded" in inspect.getsource(WebSocketProtocol)


def test_vendor__daphnes_http_factory_wraps_an_http_channel_in_channel() -> None:
    """install_limits arms the header deadline on ``protocol._channel``: twisted wraps the
    HTTPChannel to switch protocols."""
    from daphne.http_protocol import HTTPFactory
    from twisted.internet.address import IPv4Address
    from twisted.web import http

    protocol = HTTPFactory(server=None).buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
    assert isinstance(protocol._channel, http.HTTPChannel)
    assert hasattr(protocol._channel, "requestDone")


KEY_OLD = "vendor-pin-key-old-0123456789abcdefghijkl"
KEY_NEW = "vendor-pin-key-new-0123456789abcdefghijkl"


def encrypted_layer(keys: list[str]) -> Any:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from backplane.conf import channel_layers

    config = channel_layers("redis://127.0.0.1:6379", prefix="pin", keys=keys)["default"]["CONFIG"]
    assert config.get("symmetric_encryption_keys", []) == keys
    return RedisPubSubChannelLayer(**config)


def test_vendor__pubsub_layer_encrypts_with_the_first_key_and_decrypts_with_any() -> None:
    message = {"type": "bp.batch", "items": [[1, "frame"]]}
    rotated = encrypted_layer([KEY_NEW, KEY_OLD])
    token = rotated.serialize(message)
    assert b"bp.batch" not in token and b"frame" not in token
    assert encrypted_layer([KEY_OLD, KEY_NEW]).deserialize(token) == message
    with pytest.raises(vendor_redis.UNREADABLE):
        encrypted_layer([KEY_OLD]).deserialize(token)
    with pytest.raises(vendor_redis.UNREADABLE):  # plaintext, as a forger without the key sends it
        encrypted_layer([KEY_OLD]).deserialize(encrypted_layer([]).serialize(message))
    with pytest.raises(vendor_redis.UNREADABLE):  # bytes that are no message, on a layer without keys
        encrypted_layer([]).deserialize(b"\x00\xc1garbage")


def test_vendor__pubsub_serializer_refuses_a_message_older_than_the_max_age() -> None:
    import time

    import msgpack

    from backplane.conf import MESSAGE_MAX_AGE_SECS

    layer = encrypted_layer([KEY_OLD])
    crypter = layer._serializer.crypter
    assert layer._serializer.expiry == MESSAGE_MAX_AGE_SECS
    data = msgpack.packb({"type": "bp.command"})
    fresh = crypter.encrypt_at_time(data, int(time.time()) - MESSAGE_MAX_AGE_SECS)
    assert layer.deserialize(fresh) == {"type": "bp.command"}  # within channels-redis's 10 s of leeway
    with pytest.raises(vendor_redis.UNREADABLE):
        layer.deserialize(crypter.encrypt_at_time(data, int(time.time()) - MESSAGE_MAX_AGE_SECS - 60))


def test_vendor__pubsub_layer_deserializes_in_receive_not_in_its_reader() -> None:
    import inspect

    from channels_redis.pubsub import RedisPubSubLoopLayer, RedisSingleShardConnection

    # The reader task queues raw bytes; ``receive`` deserializes, so a message that cannot be
    # decrypted raises in the edge's loop (which drops it) and never stops the reader.
    assert "put_nowait(data)" in inspect.getsource(RedisSingleShardConnection._receive_message)
    assert "deserialize" not in inspect.getsource(RedisSingleShardConnection._receive_message)
    assert "return self.channel_layer.deserialize(message)" in inspect.getsource(RedisPubSubLoopLayer.receive)


def test_vendor__http_channel_says_when_it_handles_a_request() -> None:
    """The header deadline spares a channel that is handling a request (``_handlingRequest``:
    a slow response, or a socket that became a WebSocket)."""
    from daphne.http_protocol import HTTPFactory
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    protocol = HTTPFactory(server=None).buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
    protocol.makeConnection(StringTransport())
    assert protocol._channel._handlingRequest is False


def test_vendor__outbound_buffered_sees_through_a_tls_wrapper() -> None:
    """Under TLS, daphne's protocol writes to twisted's TLS wrapper, which writes the encrypted
    bytes to the TCP connection: the slow-consumer bound must read that buffer."""
    from twisted.internet import reactor, tcp
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    assert issubclass(TLSMemoryBIOProtocol, ProtocolWrapper)
    ours, peer = socket.socketpair()
    try:
        conn = tcp.Connection(ours, None, reactor)
        conn.dataBuffer, conn.offset = b"x" * 5000, 0
        wrapper = ProtocolWrapper(WrappingFactory(None), None)
        wrapper.transport = conn
        assert vendor_daphne.outbound_buffered(wrapper) == 5000
    finally:
        ours.close()
        peer.close()


def test_vendor__lean_checkers_visit_only_the_connections_with_something_to_do(monkeypatch: Any) -> None:
    """daphne's sweeps skip idle open WebSockets (docs/decisions/0027): the timeout sweep
    visits handshakes and HTTP requests, the reaper the disconnected; an open WebSocket is
    handed to the ping sweep (tests/unit/test_keepalive.py)."""
    import time
    from types import SimpleNamespace

    from daphne.server import Server
    from twisted.internet import reactor

    vendor_daphne.install_lean_checkers()
    later: list[tuple[float, Any]] = []
    monkeypatch.setattr(reactor, "callLater", lambda delay, f, *a: later.append((delay, f)))
    server = Server.__new__(Server)
    server.connections, server.action_logger, server.application_close_timeout = {}, None, 10
    server.ping_interval, server.websocket_timeout = 20, 86400
    visited: list[Any] = []

    class Request:
        def check_timeouts(self) -> None:
            visited.append(self)

    idle = daphne_protocol()
    idle.server, idle.request, idle.client_addr = server, SimpleNamespace(path="/ws"), None
    idle.socket_opened = time.time()  # set by daphne's onConnect
    idle.check_timeouts = lambda: visited.append(idle)
    leaving, opening = Request(), Request()
    for p in (idle, leaving, opening):
        server.protocol_connected(p)
    idle.state = idle.STATE_OPEN
    idle.onOpen()
    assert idle in server._tyrum_keepalive.wheel[max(server._tyrum_keepalive.wheel)]  # the ping sweep's

    server.timeout_checker()
    assert visited == [leaving, opening]  # not the open WebSocket
    server.protocol_disconnected(leaving)
    server.application_checker()
    assert list(server.connections) == [idle, opening]  # the disconnected one reaped


def _lean_server(monkeypatch: Any) -> Any:
    """daphne's server with the lean sweeps, no reactor: its sweeps are called by hand."""
    from daphne.server import Server
    from twisted.internet import reactor

    vendor_daphne.install_lean_checkers()
    monkeypatch.setattr(reactor, "callLater", lambda delay, f, *a: None)
    server = Server.__new__(Server)
    server.connections, server.action_logger, server.application_close_timeout = {}, None, 10
    server.ping_interval, server.websocket_timeout = 20, 86400
    return server


def test_vendor__a_sweep_leaves_the_servers_connections_whole_for_worker_threads(monkeypatch: Any) -> None:
    """``gone`` runs in worker threads (a resume's replay, a handshake batch) while the reactor
    thread sweeps: a sweep that showed the server's ``connections`` as only the part it visits
    would make every open socket outside it look dropped — a resume left unanswered."""
    server = _lean_server(monkeypatch)
    seen: list[bool] = []

    class Finished:  # an application instance; daphne's reaper asks it whether it is done
        def done(self) -> bool:
            seen.append(vendor_daphne.gone(open_one))  # what a worker thread reads at that moment
            return True

        def cancelled(self) -> bool:
            return False

        def exception(self) -> None:
            return None

    open_one, leaving = daphne_protocol(), daphne_protocol()
    for p in (open_one, leaving):
        p.server = server
        server.protocol_connected(p)
    server.connections[leaving]["application_instance"] = Finished()
    server.protocol_disconnected(leaving)
    server.application_checker()
    assert seen and not any(seen)  # the open socket was never seen as gone
    assert list(server.connections) == [open_one] and vendor_daphne.gone(leaving)


def test_vendor__a_socket_whose_application_ended_quietly_is_closed_4001(monkeypatch: Any) -> None:
    """daphne's reaper forgets an application that returned or was cancelled and leaves its
    socket open; the peer would wait forever. The edge closes it 4001 (reconnect and resume),
    refuses such a handshake, and leaves alone what runs or raised (daphne closes that 1011)."""
    from backplane.protocol import Close

    server = _lean_server(monkeypatch)
    loop = asyncio.new_event_loop()
    try:
        cancelled, returned, raised, running = (loop.create_future() for _ in range(4))
        cancelled.cancel()
        returned.set_result(None)
        raised.set_exception(RuntimeError("boom"))
    finally:
        loop.close()
    closes: list[tuple[str, Any]] = []
    handled: list[Any] = []
    protos = {}
    for name, instance, state in (
        ("cancelled", cancelled, "STATE_OPEN"),
        ("returned", returned, "STATE_OPEN"),
        ("handshake", returned, "STATE_CONNECTING"),
        ("raised", raised, "STATE_OPEN"),
        ("running", running, "STATE_OPEN"),
    ):
        p = daphne_protocol()
        p.server, p.state = server, getattr(p, state)
        p.serverClose = lambda code=None, name=name: closes.append((name, code))
        p.serverReject = lambda name=name: closes.append((name, "rejected"))
        p.handle_exception = handled.append
        server.protocol_connected(p)
        server.connections[p]["application_instance"] = instance
        server._tyrum_marks[0][p] = None  # as the instance's done-callback marks it
        protos[name] = p
    server.application_checker()
    assert sorted(closes) == [
        ("cancelled", int(Close.RECONNECT)),
        ("handshake", "rejected"),
        ("returned", int(Close.RECONNECT)),
    ]
    assert len(handled) == 1 and isinstance(handled[0], RuntimeError)  # daphne's own 1011
    assert "application_instance" in server.connections[protos["running"]]


def test_vendor__an_orphaned_handshake_is_refused_reaped_and_its_close_reported_once(monkeypatch: Any) -> None:
    """The real refusal: daphne's ``serverReject`` reports the disconnect, the same sweep reaps
    the connection, and autobahn's ``onClose`` reports it again afterwards — to a server that
    no longer knows it (daphne's own ``protocol_disconnected`` would raise there)."""
    from types import SimpleNamespace

    from twisted.internet.defer import Deferred

    server = _lean_server(monkeypatch)
    loop = asyncio.new_event_loop()
    try:
        ended = loop.create_future()
        ended.set_result(None)
    finally:
        loop.close()
    p = daphne_protocol()
    p.server, p.request, p.client_addr = server, SimpleNamespace(path="/ws"), None
    p.handshake_deferred = Deferred()
    refused: list[Any] = []
    p.handshake_deferred.addErrback(refused.append)
    server.protocol_connected(p)
    server.connections[p]["application_instance"] = ended
    server._tyrum_marks[0][p] = None
    server.application_checker()
    assert len(refused) == 1 and p not in server.connections  # refused (403), then reaped
    p.onClose(False, 1006, "")  # autobahn, once the TCP connection is gone: no KeyError
    assert p not in server.connections


def test_vendor__the_edge_listens_with_a_queue_for_a_reconnect_storm() -> None:
    from twisted.internet import protocol, reactor
    from twisted.internet.endpoints import serverFromString

    vendor_daphne.install_listen_backlog()
    vendor_daphne.install_listen_backlog()  # once is enough: not wrapped twice
    ports: list[Any] = []
    # As daphne listens: an endpoint string, twisted's default backlog of 50.
    serverFromString(reactor, "tcp:port=0:interface=127.0.0.1").listen(protocol.Factory()).addCallback(ports.append)
    try:
        assert ports and ports[0].backlog == vendor_daphne.LISTEN_BACKLOG
    finally:
        for port in ports:
            port.stopListening()


def test_vendor__autobahns_per_socket_debug_formatting_waits_for_a_log_line() -> None:
    from autobahn.websocket import protocol

    vendor_daphne.install_lazy_handshake_debug()
    formatted: list[int] = []

    class Counted:
        def __repr__(self) -> str:
            formatted.append(1)
            return "counted"

    lazy = protocol.pformat([Counted()])  # what _connectionMade passes to its debug line
    assert formatted == []
    assert f"{lazy}" == "[counted]" and formatted == [1]  # txaio formats with str.format
    assert str(protocol.Timings()) == "{}"  # its one str-typed use still a str


async def test_group_add_many__one_subscribe_for_the_groups_then_group_send_reaches_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import uuid

    from channels_redis.pubsub import RedisPubSubChannelLayer
    from redis.asyncio.client import PubSub

    subscribes: list[tuple[Any, ...]] = []
    real = PubSub.subscribe

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        subscribes.append(args)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(PubSub, "subscribe", counted)
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    layer = RedisPubSubChannelLayer(hosts=[url], prefix=f"gam{uuid.uuid4().hex[:8]}")
    try:
        channel = await layer.new_channel()
        subscribes.clear()
        groups = ["g1", "g2", "g3", "g2"]
        await vendor_channels.group_add_many(layer, groups, channel)
        assert len(subscribes) == 1 and len(set(subscribes[0])) == 3  # one SUBSCRIBE, no repeat
        await vendor_channels.group_add_many(layer, ["g1"], channel)
        assert len(subscribes) == 1  # subscribed already: nothing written
        await asyncio.sleep(0.05)  # the receiver reads the confirmations
        for group in ("g1", "g2", "g3"):
            await layer.group_send(group, {"type": "t", "group": group})
            assert (await asyncio.wait_for(layer.receive(channel), 2))["group"] == group
        with pytest.raises(RuntimeError):
            await vendor_channels.group_add_many(layer, ["g4"], "not-a-channel-of-this-process")
    finally:
        await layer.flush()


async def test_group_add_many__other_layers_get_one_group_add_each() -> None:
    from channels.layers import InMemoryChannelLayer

    layer = InMemoryChannelLayer()
    channel = await layer.new_channel()
    await vendor_channels.group_add_many(layer, ["a", "b"], channel)
    await layer.group_send("b", {"type": "t"})
    assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "t"}
    assert vendor_channels._pubsub_loop_layer(layer) is None


class _Channel:
    """What the header deadline reads of twisted's HTTPChannel."""

    def __init__(self) -> None:
        self._handlingRequest = False
        self.transport = _Transport()


class _Transport:
    disconnected = False

    def __init__(self) -> None:
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


def test_header_deadlines__cut_the_late_spare_the_disarmed_and_rearm_in_order() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    deadlines = vendor_daphne.HeaderDeadlines(clock, 10.0)
    late, in_time, busy, rearmed = _Channel(), _Channel(), _Channel(), _Channel()
    for channel in (late, in_time, busy, rearmed):
        deadlines.arm(channel)
    assert len(clock.getDelayedCalls()) == 1  # one timer for all of them
    clock.advance(5)
    deadlines.disarm(in_time)  # its request came in
    busy._handlingRequest = True
    deadlines.arm(rearmed)  # keep-alive: armed again, to the end of the line
    clock.advance(5 + deadlines.TICK_SECS)
    assert (late.transport.aborted, in_time.transport.aborted, busy.transport.aborted) == (1, 0, 0)
    assert rearmed.transport.aborted == 0 and late._tyrum_deadline is None
    clock.advance(4.5)
    assert rearmed.transport.aborted == 0
    clock.advance(0.5 + deadlines.TICK_SECS)
    assert rearmed.transport.aborted == 1
    assert deadlines.due == {} and clock.getDelayedCalls() == []  # nothing armed: no timer


def test_header_deadlines__a_failing_cut_stops_neither_the_others_nor_the_next_timer() -> None:
    from twisted.internet.task import Clock

    class _Broken(_Transport):
        def abortConnection(self) -> None:
            raise OSError("gone meanwhile")

    clock = Clock()
    deadlines = vendor_daphne.HeaderDeadlines(clock, 10.0)
    broken, late, later = _Channel(), _Channel(), _Channel()
    broken.transport = _Broken()
    deadlines.arm(broken)
    deadlines.arm(late)
    clock.advance(5)
    deadlines.arm(later)
    clock.advance(5 + deadlines.TICK_SECS)
    assert late.transport.aborted == 1 and later.transport.aborted == 0
    assert len(clock.getDelayedCalls()) == 1  # the sweep rescheduled for the one left
    clock.advance(5)
    assert later.transport.aborted == 1
