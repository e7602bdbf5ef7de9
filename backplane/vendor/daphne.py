"""Everything the edge does inside daphne, twisted and autobahn, beyond their public APIs.

Each attribute relied on is listed in ``RELIED_ON`` and pinned by tests/unit/test_vendor.py,
which fails when a new version renames one — instead of the edge silently reading a default.
Versions are pinned in requirements.txt.

- Direct frame writes: the fan-out writes prepared RFC 6455 frames straight to the socket,
  skipping daphne's reply dispatch and autobahn's framing (docs/decisions/0017 and 0018).
- The denial response and the slow-consumer bound, patched into daphne's ``handle_reply``.
- Probes: has daphne dropped a handshake (``gone``); is a peer's first frame on its way in
  (``frame_pending``); how many bytes twisted holds unsent (``outbound_buffered``).
- Lean sweeps (``install_lean_checkers``): daphne's periodic checks visit only the connections
  that need them (docs/decisions/0027-head-check-change-feed.md); open WebSockets' pings run
  from one sweep of their own (``keepalive``, docs/decisions/0033).
- Limits (``install_limits``): autobahn's own inbound cap (close 4009), pings spending the
  inbound bucket (4029), a deadline for request headers; and an access log without query
  strings (``install_access_log_without_query_strings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import weakref
from typing import Any

from backplane import process
from backplane.conf import conf
from backplane.protocol import Close

logger = logging.getLogger(__name__)

try:
    # Transports holding a socket and twisted's write buffer; plain TCP ones are written to
    # with send() directly.
    from twisted.internet.abstract import FileDescriptor as _FileDescriptor
    from twisted.internet.tcp import Connection as PLAIN_TCP
    from twisted.protocols.policies import ProtocolWrapper as _ProtocolWrapper
except ImportError:  # pragma: no cover  (daphne brings twisted)
    _FileDescriptor = PLAIN_TCP = _ProtocolWrapper = ()  # type: ignore[assignment,misc]

# (module, class, attribute): what this module reads or patches. Instance attributes are
# checked on real instances by the pin test.
RELIED_ON = (
    ("daphne.ws_protocol", "WebSocketProtocol", "handle_reply"),
    ("daphne.ws_protocol", "WebSocketProtocol", "STATE_OPEN"),
    ("daphne.ws_protocol", "WebSocketProtocol", "STATE_CONNECTING"),
    ("daphne.ws_protocol", "WebSocketProtocol", "SEND_STATE_GROUND"),
    ("daphne.ws_protocol", "WebSocketProtocol", "sendClose"),
    ("daphne.ws_protocol", "WebSocketProtocol", "applicationCreateWorked"),  # sets application_queue
    ("twisted.internet.abstract", "FileDescriptor", "dataBuffer"),
    ("twisted.internet.abstract", "FileDescriptor", "offset"),
    ("twisted.internet.tcp", "Connection", "TLS"),  # send_now: a connection that started TLS
    ("daphne.server", "Server", "protocol_disconnected"),
    ("daphne.access", "AccessLogGenerator", "__call__"),
    ("daphne.access", "AccessLogGenerator", "write_entry"),
    ("daphne.ws_protocol", "WebSocketProtocol", "onPing"),
    ("daphne.ws_protocol", "WebSocketProtocol", "_max_message_size_exceeded"),
    ("daphne.ws_protocol", "WebSocketProtocol", "_fail_connection"),
    ("daphne.ws_protocol", "WebSocketProtocol", "CONFIG_ATTRS"),  # names failByDrop and the sizes
    ("daphne.http_protocol", "HTTPFactory", "buildProtocol"),
    ("daphne.http_protocol", "WebRequest", "process"),
    ("twisted.web.http", "HTTPChannel", "requestDone"),
    ("twisted.protocols.policies", "ProtocolWrapper", "transport"),
    ("daphne.server", "Server", "protocol_connected"),
    ("daphne.server", "Server", "create_application"),
    ("daphne.server", "Server", "application_checker"),
    ("daphne.server", "Server", "timeout_checker"),
    ("daphne.ws_protocol", "WebSocketProtocol", "onOpen"),
    ("daphne.ws_protocol", "WebSocketProtocol", "duration"),
    ("daphne.ws_protocol", "WebSocketProtocol", "serverClose"),
    ("daphne.ws_protocol", "WebSocketProtocol", "serverReject"),
    ("daphne.ws_protocol", "WebSocketProtocol", "sendPing"),  # keepalive: a ping behind queued frames
    ("daphne.ws_protocol", "WebSocketProtocol", "onAutoPingTimeout"),  # keepalive: no pong in time
    ("daphne.ws_protocol", "WebSocketProtocol", "dataReceived"),  # keepalive: the fast pong
    ("daphne.ws_protocol", "WebSocketProtocol", "sendData"),  # what sendFrame writes through
    ("autobahn.websocket.protocol", "WebSocketProtocol", "_connectionMade"),  # calls the module's pformat
    ("autobahn.websocket.protocol", "Timings", "__str__"),
)
# Set on instances: daphne's protocol (state, send_state, data, transport, server,
# application_queue, handshake_deferred, _perMessageCompress, closeHandshakeTimeout), twisted's
# TCP transport (socket, _tempDataLen, disconnected, disconnecting), daphne's server
# (connections: protocol -> {"disconnected": ..., "application_instance": ...}, ping_interval,
# websocket_timeout), daphne's WebSocket protocol's last_ping and autobahn's send_queue.


def protocol_of(send: Any) -> Any:
    """daphne's protocol object behind an ASGI ``send`` (``partial(handle_reply, protocol)``),
    or None when not under daphne."""
    if not isinstance(send, functools.partial) or not send.args:
        return None
    return send.args[0]


def gone(proto: Any) -> bool:
    """Whether daphne has dropped the connection of ``proto`` (its handshake timed out, or
    the peer left). False when not under daphne."""
    if proto is None:
        return False
    entry = proto.server.connections.get(proto)
    return entry is None or "disconnected" in entry


def direct_wire(proto: Any) -> Any:
    """``proto`` if frames can be written straight to its transport (daphne, and no
    per-message compression negotiated: its frames would need compressing); else None."""
    if proto is None or proto._perMessageCompress is not None:
        return None
    return proto


def frame_pending(proto: Any) -> bool:
    """Whether the peer has sent something not dispatched yet: a message in daphne's
    application queue, a partial frame in autobahn's buffer, or bytes unread in the kernel.
    False when not under daphne."""
    if proto is None:
        return False
    if proto.application_queue.qsize() > 0 or proto.data:
        return True
    sock = getattr(proto.transport, "socket", None)  # test transports have none
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing unread; others: the socket is going away
        return False


@functools.cache
def outbound_limit() -> int:
    """MAX_OUTBOUND_BUFFER_BYTES, read once (it is checked for every frame sent)."""
    return int(conf.MAX_OUTBOUND_BUFFER_BYTES)


def outbound_buffered(transport: Any) -> int:
    """Bytes a twisted transport holds that the peer has not taken yet: its own TCP buffer's,
    under any wrappers (TLS: ``TLSMemoryBIOProtocol`` writes the encrypted bytes there)."""
    for _ in range(4):  # a wrapper or two at most (TLS, a policy)
        if not isinstance(transport, _ProtocolWrapper):
            break
        transport = transport.transport
    if not isinstance(transport, _FileDescriptor):
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def closing(proto: Any) -> bool:
    """Whether daphne's side of the socket is closing (a slow consumer being closed with
    4013, or a close frame sent or received). False when not under daphne."""
    if proto is None:
        return False
    return bool(getattr(proto, "_tyrum_slow", False)) or proto.state != proto.STATE_OPEN


def share_inbound_bucket(proto: Any, bucket: Any) -> None:
    """Let WebSocket pings draw on the socket's inbound bucket, like its frames do
    (``install_limits``): a ping flood costs the edge work too."""
    if proto is not None:
        proto._tyrum_inbound = bucket


def write_direct(proto: Any, data: bytes, coalescer: Coalescer) -> bool:
    """Write a prepared frame to daphne's transport. Return False when it must go the
    ASGI way instead: the socket is not plainly open, a frame is half sent, or the peer's
    unread bytes are past the slow-consumer bound (the ASGI path closes 4013).

    Called once per socket per frame of a fan-out: one look-up of the socket's held frames,
    no method calls but the buffer probe (docs/decisions/0028-fan-out-per-socket-cost.md)."""
    if proto.state != proto.STATE_OPEN or proto.send_state != proto.SEND_STATE_GROUND:
        return False
    if getattr(proto, "_tyrum_slow", False):
        return True  # closing with 4013: further frames are dropped
    pending = coalescer.pending
    key = id(proto)
    entry = pending.get(key)
    t = proto.transport
    if isinstance(t, _FileDescriptor):  # plain TCP: outbound_buffered's answer, without the call
        buffered = len(t.dataBuffer) - t.offset + t._tempDataLen
    else:
        buffered = outbound_buffered(t)
    if buffered + (entry[2] if entry is not None else 0) > outbound_limit():
        return False
    if entry is None:
        pending[key] = [proto, [data], len(data)]
        if not coalescer.scheduled:
            coalescer.scheduled = True
            coalescer.loop.call_soon(coalescer.flush_all)
        return True
    entry[1].append(data)
    entry[2] += len(data)
    if entry[2] >= coalescer.FLUSH_BYTES:
        coalescer.flush(proto)
    return True


class Coalescer:
    """The frames written directly to each socket in one loop turn, sent together at the
    end of the turn: one ``send()`` per socket per turn (docs/decisions/0018-coalesced-frames-per-loop-turn.md).
    A socket's held frames are at most FLUSH_BYTES (a long replay goes out as it goes), and
    count towards the slow-consumer bound (``held``). Held frames are keyed by the protocol's
    ``id()``: daphne's protocol hashes in Python, twice per frame of a fan-out otherwise (the
    entry keeps the protocol alive, so its id is not reused while it waits)."""

    FLUSH_BYTES = 64 * 1024

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[int, list[Any]] = {}  # id(proto) -> [proto, frames, bytes]
        self.scheduled = False

    def held(self, proto: Any) -> int:
        entry = self.pending.get(id(proto))
        return entry[2] if entry is not None else 0

    def write(self, proto: Any, data: bytes) -> None:
        entry = self.pending.get(id(proto))
        if entry is not None:
            entry[1].append(data)
            entry[2] += len(data)
            if entry[2] >= self.FLUSH_BYTES:
                self.flush(proto)
            return
        self.pending[id(proto)] = [proto, [data], len(data)]
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush_all)

    def flush(self, proto: Any) -> None:
        entry = self.pending.pop(id(proto), None)
        if entry is not None:
            _send_frames(proto, entry[1])

    def flush_all(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        for proto, frames, _ in pending.values():
            _send_frames(proto, frames)


def _send_frames(proto: Any, frames: list[bytes]) -> None:
    """Send a socket's held frames, unless its close frame went out meanwhile (nothing may
    follow it). A socket whose send fails unexpectedly is cut (its peer resumes); the other
    sockets' frames still go."""
    if proto.state != proto.STATE_OPEN:
        return
    try:
        send_now(proto.transport, frames[0] if len(frames) == 1 else b"".join(frames))
    except Exception as exc:
        logger.error(
            "frame write failed (%s): dropping the connection", type(exc).__name__, extra={"action": "write_error"}
        )
        with contextlib.suppress(Exception):
            proto.transport.abortConnection()


_coalescers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Coalescer] = weakref.WeakKeyDictionary()


def coalescer() -> Coalescer:
    """The running loop's coalescer (a consumer keeps it: its loop does not change)."""
    loop = asyncio.get_running_loop()
    found = _coalescers.get(loop)
    if found is None:
        found = _coalescers[loop] = Coalescer(loop)
    return found


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a twisted transport: with one ``send()`` when it is a plain TCP
    connection holding nothing unsent, the rest (if the kernel took part) through
    ``transport.write``. Anything else — TLS (only twisted's own ``write`` encrypts), a test
    double — goes through ``transport.write``."""
    if transport.disconnected or transport.disconnecting:
        return
    # Plain TCP (outbound_buffered's answer inlined: this runs once per socket per fan-out).
    if (
        not isinstance(transport, PLAIN_TCP)
        or transport.TLS
        or len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    ):
        transport.write(data)
        return
    sock = transport.socket
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:  # the connection is going away: twisted finds out and closes it
        transport.write(data)  # type: ignore[no-untyped-call]
        return
    if sent < len(data):
        transport.write(data[sent:])  # type: ignore[no-untyped-call]


# The last batch's frames joined (``joined``): the edge hands a batch to each of its sockets in
# turn, so every socket after the first finds the bytes made (or finds them too many).
_joined: tuple[list[bytes] | None, bytes | None] = (None, None)


def joined(frames: list[bytes]) -> bytes | None:
    """The bytes of ``frames`` (a batch's prepared frames) one after another, joined once per
    batch, so that a socket taking the whole batch gets them in one ``write_direct``; None when
    they pass ``Coalescer.FLUSH_BYTES``: the slow-consumer bound, checked before each write,
    is passed by at most that much (docs/decisions/0046-edge-delivers-what-piled-up-together.md)."""
    global _joined
    last, data = _joined
    if last is not frames:
        data = b"".join(frames) if sum(map(len, frames)) <= Coalescer.FLUSH_BYTES else None
        _joined = (frames, data)
    return data


def ws_text_frame(text: str) -> bytes:
    """The bytes of one unfragmented, unmasked WebSocket text frame (RFC 6455 5.2) carrying
    ``text``: what a server writes to any peer for it, so it is built once per fan-out."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + data
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + data


def install_denial_response() -> None:
    """Teach daphne two things the protocol needs and its application API cannot express.

    1. The ASGI "websocket.http.response" extension, for HTTP refusals other than 403 (503
       when a credential cannot be checked right now, so peers retry with backoff).
    2. A slow-consumer bound: daphne buffers every send with no backpressure. When a peer's
       unsent bytes pass ``MAX_OUTBOUND_BUFFER_BYTES``, further frames are dropped and the
       socket is closed with 4013 (the close frame queues behind what is buffered; the peer
       gets ``SLOW_CLOSE_GRACE_SECS`` to read up to it before the connection is cut).
    """
    try:
        from autobahn.websocket.types import ConnectionDeny
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not running under daphne
        return
    if getattr(WebSocketProtocol, "_tyrum_denial", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            status = int(message.get("status", 503))
            deny = ConnectionDeny(code=status, reason=_phrase(status))  # type: ignore[no-untyped-call]
            self.handshake_deferred.errback(deny)
            del self.handshake_deferred
            self.server.protocol_disconnected(self)
            return
        if kind == "websocket.http.response.body":
            return
        if kind == "websocket.send" and self.state == self.STATE_OPEN:
            if getattr(self, "_tyrum_slow", False):
                return  # already closing with 4013: drop further frames
            if outbound_buffered(self.transport) > outbound_limit():
                self._tyrum_slow = True
                logger.warning("slow consumer: closing with 4013", extra={"action": "slow_consumer"})
                self.closeHandshakeTimeout = conf.SLOW_CLOSE_GRACE_SECS
                self.sendClose(code=int(Close.SLOW_CONSUMER))
                return
        original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._tyrum_denial = True


def install_limits(max_message_bytes: int, header_timeout: float) -> None:
    """The WebSocket layer's own inbound limits, and a deadline for request headers.

    - Messages and frames over ``max_message_bytes`` are refused by autobahn as they arrive
      (nothing larger is buffered), with the protocol's close code 4009 rather than a dropped
      TCP connection (``failByDrop`` off: protocol failures close with a code).
    - WebSocket pings spend the socket's inbound bucket (``share_inbound_bucket``); past it
      the socket is closed with 4029, like a flood of frames.
    - A client must send a request's headers within ``header_timeout`` seconds of connecting
      (or of its previous request's end): a client trickling header bytes is cut
      (``HeaderDeadlines``).
    """
    try:
        from daphne.http_protocol import HTTPFactory, WebRequest
        from daphne.ws_protocol import WebSocketProtocol
        from twisted.internet import reactor
        from twisted.web import http
    except ImportError:  # not running under daphne
        return

    if getattr(WebSocketProtocol, "_tyrum_limits", False):
        return
    # Class attributes win over the factory's options (autobahn copies only unset ones).
    WebSocketProtocol.maxMessagePayloadSize = max_message_bytes
    WebSocketProtocol.maxFramePayloadSize = max_message_bytes
    WebSocketProtocol.failByDrop = False

    def too_big(self: Any, size: int, limit: int, reason: str) -> None:
        self._fail_connection(int(Close.FRAME_TOO_LARGE), "frame too large")

    WebSocketProtocol._max_message_size_exceeded = too_big
    on_ping = WebSocketProtocol.onPing

    def onPing(self: Any, payload: bytes) -> None:
        bucket = getattr(self, "_tyrum_inbound", None)
        if bucket is not None and not bucket.take(time.monotonic()):
            if self.state == self.STATE_OPEN:
                self.sendClose(code=int(Close.RATE_LIMITED))
            return
        on_ping(self, payload)

    WebSocketProtocol.onPing = onPing
    WebSocketProtocol._tyrum_limits = True

    build = HTTPFactory.buildProtocol
    deadlines = HeaderDeadlines(reactor, header_timeout)
    arm, disarm = deadlines.arm, deadlines.disarm

    def buildProtocol(self: Any, addr: Any) -> Any:
        protocol = build(self, addr)
        # twisted wraps the HTTPChannel (to switch to HTTP/2 when negotiated): arm the channel.
        arm(getattr(protocol, "_channel", protocol))
        return protocol

    process = WebRequest.process

    def process_request(self: Any) -> Any:
        disarm(self.channel)  # the request is in: its headers arrived in time
        return process(self)

    request_done = http.HTTPChannel.requestDone

    def requestDone(self: Any, request: Any) -> None:
        # Keep-alive: the next request's headers get the same deadline. Armed first: a
        # pipelined request that twisted parses inside requestDone disarms it in process().
        if getattr(self, "_tyrum_deadline", "unset") is None and not self.transport.disconnected:
            arm(self)
        request_done(self, request)  # type: ignore[no-untyped-call]

    HTTPFactory.buildProtocol = buildProtocol
    WebRequest.process = process_request
    http.HTTPChannel.requestDone = requestDone  # type: ignore[method-assign]


class HeaderDeadlines:
    """The request-header deadlines of every connection, in arming order, kept by one reactor
    timer that wakes at most every ``TICK_SECS``: a connection is cut up to ``TICK_SECS`` after
    its deadline. In a connect storm a timer per connection (a ``DelayedCall`` and its heap
    entry, armed and cancelled at once) was per-handshake work (docs/decisions/0038)."""

    TICK_SECS = 0.25

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        # channel -> deadline (the reactor's clock, as its timers use). Each arming comes last with the same timeout,
        # so the dict's order is the deadlines' order and a sweep stops at the first not due.
        self.due: dict[Any, float] = {}
        self.timer: Any = None

    def arm(self, channel: Any) -> None:
        due = self.due
        due.pop(channel, None)  # armed again (keep-alive): to the end, in deadline order
        due[channel] = self.reactor.seconds() + self.timeout
        channel._tyrum_deadline = True
        if self.timer is None:
            self.timer = self.reactor.callLater(self.timeout + self.TICK_SECS, self.sweep)

    def disarm(self, channel: Any) -> None:
        self.due.pop(channel, None)
        channel._tyrum_deadline = None

    def sweep(self) -> None:
        self.timer = None
        now = self.reactor.seconds()
        expired = []
        for channel, at in self.due.items():
            if at > now:
                break
            expired.append(channel)
        for channel in expired:
            del self.due[channel]
            channel._tyrum_deadline = None
            try:
                self.cut(channel)
            except Exception:  # one connection's failure must not stop the sweep's next timer
                logger.exception("request deadline: cutting a connection failed", extra={"action": "request_timeout"})
        for at in self.due.values():  # the first: the next deadline
            self.timer = self.reactor.callLater(max(at - now, self.TICK_SECS), self.sweep)
            break

    @staticmethod
    def cut(channel: Any) -> None:
        transport = channel.transport
        if transport is None or transport.disconnected:
            return
        if channel._handlingRequest or outbound_buffered(transport):
            # A request came in meanwhile (its response may be slow, or the socket is a
            # WebSocket now) or a response is still going out: not a slow client.
            return
        logger.warning("request too slow to arrive: connection cut", extra={"action": "request_timeout"})
        transport.abortConnection()


# The edge's listen queue: connections the kernel holds until the edge accepts them. twisted's
# default of 50 overflows in a reconnect storm (thousands of peers at once): the kernel drops
# their SYNs and each peer waits out TCP's retransmission back-off (1, 3, 7, 15 s …) —
# docs/decisions/0026. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def install_listen_backlog(minimum: int = LISTEN_BACKLOG) -> None:
    """Listen with a queue of at least ``minimum`` connections (daphne's endpoints pass
    twisted's default of 50 to ``reactor.listenTCP``)."""
    from twisted.internet import reactor

    listen: Any = getattr(reactor, "listenTCP", None)
    if listen is None or getattr(listen, "_tyrum_backlog", False):
        return

    def listenTCP(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return listen(port, factory, max(minimum, backlog), interface)

    listenTCP._tyrum_backlog = True  # type: ignore[attr-defined]
    setattr(reactor, "listenTCP", listenTCP)  # noqa: B010  # the installed reactor, daphne's


class _LazyFormat:
    """``pformat(value)`` done only when a log line is really written."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        import pprint

        return pprint.pformat(self.value)

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731  # txaio formats with str.format


def install_lazy_handshake_debug() -> None:
    """autobahn pretty-prints every new socket's configuration for a debug line (``pformat``
    in ``WebSocketProtocol._connectionMade``) whether debug logging is on or not: in a
    connect storm a tenth of the edge's event loop (docs/decisions/0026). The formatting now
    happens only when that line is written."""
    try:
        from autobahn.websocket import protocol
    except ImportError:  # not running under daphne
        return
    if getattr(protocol, "_tyrum_lazy_pformat", False):
        return
    import pprint

    setattr(protocol, "pformat", _LazyFormat)  # noqa: B010  # a module global autobahn calls
    # Its one use that must be a str at once: timings (off unless trackTimings).
    protocol.Timings.__str__ = lambda self: pprint.pformat(self._timings)  # type: ignore[method-assign]
    setattr(protocol, "_tyrum_lazy_pformat", True)  # noqa: B010


def install_access_log_without_query_strings() -> None:
    """Keep query strings out of daphne's access log: a client that puts a credential in the
    URL (refused, but logged first) must not leave it on disk."""
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:  # not running under daphne
        return

    if getattr(AccessLogGenerator, "_tyrum_paths_only", False):
        return
    original = AccessLogGenerator.__call__

    def __call__(self: Any, protocol: str, action: str, details: dict[str, Any]) -> None:
        path = details.get("path")
        if isinstance(path, str) and ("?" in path or ";" in path):
            details = {**details, "path": path.split("?", 1)[0].split(";", 1)[0]}
        original(self, protocol, action, details)

    AccessLogGenerator.__call__ = __call__
    AccessLogGenerator._tyrum_paths_only = True


def install_access_log_as_records() -> None:
    """Send daphne's access log through logging (logger ``backplane.access``, ``action``
    ``access``) instead of daphne's own stream writes: with ``LOG_FORMAT=json`` every line a
    process writes is then one JSON object. Paths only (``install_access_log_without_query_strings``)."""
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:  # not running under daphne
        return
    if getattr(AccessLogGenerator, "_tyrum_records", False):
        return
    access = logging.getLogger("backplane.access")

    def write_entry(
        self: Any,
        host: str,
        date: Any,
        request: str,
        status: Any = None,
        length: Any = None,
        ident: Any = None,
        user: Any = None,
    ) -> None:
        access.info(
            "%s %s %s",
            host,
            request,
            status or "-",
            extra={"action": "access", "client": host, "request": request, "status": status, "length": length},
        )

    AccessLogGenerator.write_entry = write_entry
    AccessLogGenerator._tyrum_records = True


def _phrase(status: int) -> str:
    import http

    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Refused"


def install_lean_checkers() -> None:
    """daphne's two sweeps visit every connection: ``application_checker`` each second (reaps
    finished applications), ``timeout_checker`` every 2 s (timeouts and each WebSocket's ping
    when due) — with 10 000 idle peers most of an edge's idle CPU. Here each visits only the
    connections it has something to do for, marked when it happens: the reaper those that
    disconnected or whose application finished; the timeouts those not (yet, or no longer) an
    open WebSocket (HTTP requests, handshakes). An open WebSocket is pinged (``keepalive``'s
    sweep) when ``ping_interval`` has passed since its last ping or inbound message, and is
    closed after ``websocket_timeout``, as daphne's sweep would (to the sweep, not to 2 s)."""
    from daphne.server import Server
    from daphne.ws_protocol import WebSocketProtocol

    if getattr(Server, "_tyrum_lean_checkers", False):
        return
    Server._tyrum_lean_checkers = True
    connected, disconnected = Server.protocol_connected, Server.protocol_disconnected
    create, reap, timeouts, on_open = (
        Server.create_application,
        Server.application_checker,
        Server.timeout_checker,
        WebSocketProtocol.onOpen,
    )

    def protocol_connected(self: Any, protocol: Any) -> None:
        connected(self, protocol)
        _marks(self)[1][protocol] = None
        # The freezer counts sockets: not the HTTP request a socket's upgrade came in on.
        if process.freezer is not None and isinstance(protocol, WebSocketProtocol):
            process.freezer.connected()

    def protocol_disconnected(self: Any, protocol: Any) -> None:
        if protocol not in self.connections:
            return  # refused, then reaped before autobahn's onClose reported it again
        # A refused or dropped handshake is reported twice (the refusal, then autobahn's
        # onClose); daphne records the first only, and so does the freezer's count.
        first = "disconnected" not in self.connections[protocol]
        disconnected(self, protocol)
        _marks(self)[0][protocol] = None
        if first and process.freezer is not None and isinstance(protocol, WebSocketProtocol):
            process.freezer.disconnected()

    def create_application(self: Any, protocol: Any, scope: Any) -> Any:
        queue = create(self, protocol, scope)
        instance = self.connections.get(protocol, {}).get("application_instance")
        if instance is not None:
            marked = _marks(self)[0]
            instance.add_done_callback(lambda _: marked.__setitem__(protocol, None))
        return queue

    def application_checker(self: Any) -> None:
        marked = _marks(self)[0]
        for protocol in list(marked):  # a refusal marks (protocol_disconnected)
            try:
                _close_orphaned(self, protocol, WebSocketProtocol)
            except Exception:  # never in the way of the reaper (it reschedules itself)
                logger.exception("closing an orphaned socket failed", extra={"action": "orphaned_socket"})
        # Kept: the disconnected whose application still runs (its close timeout runs on).
        _visit(self, reap, marked, lambda p, d: "disconnected" in d)
        if process.freezer is not None:  # the long-lived connections out of full collections (0040)
            process.freezer.tick()

    def timeout_checker(self: Any) -> None:
        _visit(self, timeouts, _marks(self)[1], lambda p, d: not _open_websocket(p))

    def onOpen(self: Any) -> None:  # noqa: N802  (autobahn's name)
        on_open(self)
        _marks(self.server)[1].pop(self, None)
        _ping_later(self, self.server.ping_interval)

    Server.protocol_connected = protocol_connected
    Server.protocol_disconnected = protocol_disconnected
    Server.create_application = create_application
    Server.application_checker = application_checker
    Server.timeout_checker = timeout_checker
    WebSocketProtocol.onOpen = onOpen


def _marks(server: Any) -> tuple[dict[Any, None], dict[Any, None]]:
    """(to reap, to check for timeouts): the connections each sweep visits next."""
    marks = server.__dict__.get("_tyrum_marks")
    if marks is None:
        marks = server._tyrum_marks = ({}, {})
    return marks  # type: ignore[no-any-return]


def _visit(server: Any, sweep: Any, marked: dict[Any, None], keep: Any) -> None:
    """Run daphne's ``sweep`` over the ``marked`` connections only. The sweep gets a view of
    the server whose ``connections`` are those (it reads and deletes in them); the server's
    own ``connections`` stays whole, as worker threads read it meanwhile (``gone``: a socket
    missing from it has been dropped)."""
    everything = server.connections
    some = {p: everything[p] for p in marked if p in everything}
    marked.clear()
    visited = dict(some)
    sweep(_Sweeping(server, some))
    for protocol, details in visited.items():
        if protocol not in some:  # reaped
            everything.pop(protocol, None)
        elif keep(protocol, details):
            marked[protocol] = None


class _Sweeping:
    """daphne's server as one of its sweeps sees it: ``connections`` is the part to visit;
    everything else (settings, ``stop``, the sweep rescheduling itself) is the server's."""

    def __init__(self, server: Any, connections: dict[Any, Any]) -> None:
        self.__dict__.update(_server=server, connections=connections)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_server"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_server"], name, value)


def _close_orphaned(server: Any, protocol: Any, websocket_class: Any) -> None:
    """Close a WebSocket whose application ended while the socket stayed open. daphne's
    reaper closes one whose application raised, but one that returned or was cancelled it
    forgets silently: the peer would wait forever for frames nobody sends. Closed 4001, the
    peer reconnects and resumes; a handshake still pending is refused."""
    details = server.connections.get(protocol)
    if not isinstance(protocol, websocket_class) or details is None or "disconnected" in details:
        return
    instance = details.get("application_instance")
    if instance is None or not instance.done() or (not instance.cancelled() and instance.exception() is not None):
        return  # running; or raised, which daphne's reaper closes (1011)
    if protocol.state == protocol.STATE_CONNECTING:
        logger.warning("application ended during its handshake: refused", extra={"action": "orphaned_socket"})
        protocol.serverReject()
    elif protocol.state == protocol.STATE_OPEN:
        logger.warning(
            "application ended with its socket open: closing %d", Close.RECONNECT, extra={"action": "orphaned_socket"}
        )
        protocol.serverClose(code=int(Close.RECONNECT))


def _open_websocket(protocol: Any) -> bool:
    return getattr(protocol, "state", None) == getattr(protocol, "STATE_OPEN", object())


def _ping_later(proto: Any, delay: float) -> None:
    """The open WebSocket's pings and pong timeout, from ``delay`` seconds on: one sweep for
    all sockets, the pong on a fast path (``keepalive``, docs/decisions/0033)."""
    from backplane.vendor import keepalive

    keepalive.keepalive(proto.server).watch(proto, delay)


def stop_reactor() -> bool:
    """Stop twisted's reactor (daphne's process exits); False when there is none."""
    try:
        from twisted.internet import reactor

        reactor.stop()  # type: ignore[misc]  # twisted's interfaces declare methods without self
        return True
    except Exception:
        return False
