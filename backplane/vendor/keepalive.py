"""WebSocket pings on an edge at the cost of memory, not CPU (docs/decisions/0033).

The protocol is daphne's and autobahn's: an open WebSocket is pinged when ``--ping-interval``
has passed since its last ping or inbound message (daphne's ``last_ping``), and closed when
the pong has not come ``--ping-timeout`` after the ping (autobahn's ``onAutoPingTimeout``).
What changes is what a ping and its pong cost the edge:

- **One sweep, many pings** (``Keepalive``): one reactor timer every ``SWEEP_SECS`` visits
  the sockets due in that slot of a timing wheel, instead of a twisted timer per socket and
  autobahn's batched-timer entry per ping timeout. The pings of a sweep go out in batches of
  ``VISITS_PER_TURN``, one per turn of the event loop, so their pongs come back together and
  share the loop's turns and ``epoll_wait`` calls, and a frame to deliver waits behind one
  batch at most, not behind a whole slot's pings (docs/decisions/0040).
- **Pings without allocations beyond the frame**: autobahn's payload (send time in ns and a
  sequence number — its default ``autoPingSize`` of 12 has no random part), one ``send()``
  when nothing is queued (``send_now``); the pong deadline is a sentinel in autobahn's
  ``autoPingTimeoutCall`` that the sweep reads, not a timer object.
- **The pong on a fast path** (``install_fast_pong``): a complete masked pong frame that
  arrives alone and echoes the pending ping is recognised in ``dataReceived`` before autobahn's
  parser (its logging, frame objects and callbacks). Anything else — another payload, a pong
  split over reads or sharing one with other frames, an unmasked one — takes autobahn's path,
  which checks it as before (``processControlFrame``: a match clears the pending ping).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import struct
import time
from typing import Any

from backplane.vendor.daphne import send_now

logger = logging.getLogger(__name__)

# The sweep's period: a ping goes out at most this late, a silent peer is closed at most this
# late; pings due within one slot go out together (0033's measurements), VISITS_PER_TURN
# at a time.
SWEEP_SECS = 0.25

# At most this many sockets visited in one turn of the event loop, the rest of a sweep's in the
# turns after: 20 000 peers have 250 pings due per slot, ~10 ms of the loop at once four times
# a second, which a delivered frame waited behind (docs/decisions/0040).
VISITS_PER_TURN = 32

_PAYLOAD = struct.Struct(">QL")  # autobahn's auto-ping payload: sent (ns), sequence number
_PING_HEADER = bytes((0x89, _PAYLOAD.size))  # FIN + ping, unmasked, 12 bytes
_PONG_HEADER = (0x8A, 0x80 | _PAYLOAD.size)  # FIN + pong, masked (every client frame is)
_PONG_FRAME_LEN = 2 + 4 + _PAYLOAD.size


class _PongDue:
    """autobahn's ``autoPingTimeoutCall`` while a ping of ours waits for its pong: autobahn
    cancels it (its pong path, any data frame, a lost connection) and clears
    ``autoPingPending``, which is what the sweep reads; there is no timer to cancel."""

    __slots__ = ()

    def cancel(self) -> None:
        pass

    def active(self) -> bool:
        return True


PONG_DUE = _PongDue()


def pong_pending(proto: Any) -> bool:
    """A ping of ours is unanswered (no pong echoing it, no data frame since)."""
    return proto.autoPingTimeoutCall is PONG_DUE and proto.autoPingPending is not None


class Keepalive:
    """The pings of one daphne server's open WebSockets, on a timing wheel of ``SWEEP_SECS``
    slots: each socket sits in the slot of the next thing to do for it (a ping, its pong's
    deadline, daphne's ``websocket_timeout``), one reactor timer runs the sweep."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.wheel: dict[int, list[Any]] = {}
        self.slot = int(time.monotonic() / SWEEP_SECS)  # the last slot swept
        self.call: Any = None
        self.due: collections.deque[Any] = collections.deque()  # swept, not visited yet
        self.more: Any = None  # the next turn's visit_some, while some are due

    def watch(self, proto: Any, delay: float) -> None:
        """Visit ``proto`` in ``delay`` seconds (or at the first sweep after)."""
        slot = max(self.slot + 1, math.ceil((time.monotonic() + delay) / SWEEP_SECS))
        bucket = self.wheel.get(slot)
        if bucket is None:
            self.wheel[slot] = [proto]
        else:
            bucket.append(proto)
        if self.call is None:
            self._arm()

    def _arm(self) -> None:
        from twisted.internet import reactor

        if self.call is not None:  # one timer for the wheel, however many sockets wait
            return
        # To the start of the next slot: a slot's sockets are visited once it has begun.
        delay = (self.slot + 1) * SWEEP_SECS - time.monotonic()
        self.call = reactor.callLater(max(0.0, delay) + 0.001, self.sweep)  # type: ignore[arg-type]  # twisted's interface

    def sweep(self) -> None:
        self.call = None
        now_slot = int(time.monotonic() / SWEEP_SECS)
        if now_slot - self.slot <= len(self.wheel):
            slots: Any = range(self.slot + 1, now_slot + 1)
        else:  # the loop stalled for long: the slots that are there, not every one in between
            slots = sorted(s for s in self.wheel if s <= now_slot)
        self.slot = max(self.slot, now_slot)
        for slot in slots:
            bucket = self.wheel.pop(slot, None)
            if bucket:
                self.due.extend(bucket)
        try:
            if self.more is None:
                self.visit_some()
        finally:
            if self.wheel:
                self._arm()

    def visit_some(self) -> None:
        """Visit at most VISITS_PER_TURN of the due sockets; the rest in the loop's next turn,
        after the frames and pongs that arrived meanwhile."""
        from twisted.internet import reactor

        self.more = None
        due = self.due
        now = time.time()  # daphne's last_ping is wall-clock time
        for _ in range(min(VISITS_PER_TURN, len(due))):
            proto = due.popleft()
            try:
                self.visit(proto, now)
            except Exception as exc:  # one broken socket must not stop the others' pings
                logger.warning("ping sweep: %s, connection dropped", type(exc).__name__)
                with contextlib.suppress(Exception):
                    proto.dropConnection(abort=True)
        if due:
            self.more = reactor.callLater(0, self.visit_some)  # type: ignore[arg-type]  # twisted's interface

    def visit(self, proto: Any, now: float) -> None:
        """daphne's ``check_timeouts`` for an open WebSocket and autobahn's pong timeout."""
        if proto.state != proto.STATE_OPEN:
            return  # closing or closed: autobahn's close handshake timeouts take over
        server = self.server
        if 0 <= server.websocket_timeout < proto.duration():
            proto.serverClose()
            return
        timeout = proto.autoPingTimeout
        if pong_pending(proto):
            deadline = proto.autoPingPendingSent / 1e9 + timeout
            if now >= deadline:
                proto.onAutoPingTimeout()  # autobahn's: not clean, the connection dropped
                return
            delay = deadline - now  # no second ping while one is unanswered
        else:
            if now - proto.last_ping >= server.ping_interval:
                send_ping(proto, now)
            delay = proto.last_ping + server.ping_interval - now
            if timeout > 0 and pong_pending(proto):
                delay = min(delay, timeout)
        if server.websocket_timeout >= 0:
            delay = min(delay, server.websocket_timeout - proto.duration() + 0.01)
        self.watch(proto, delay)


def keepalive(server: Any) -> Keepalive:
    found = server.__dict__.get("_tyrum_keepalive")
    if found is None:
        found = server._tyrum_keepalive = Keepalive(server)
    return found  # type: ignore[no-any-return]


def send_ping(proto: Any, now: float) -> None:
    """autobahn's auto-ping (its payload and pending state; the pong's deadline is read by the
    sweep), the frame written with one ``send()`` when nothing is queued before it; when a
    message is half sent or autobahn queues frames, its own path keeps the order."""
    sent = time.time_ns()
    proto.autoPingPendingSeq += 1
    payload = _PAYLOAD.pack(sent, proto.autoPingPendingSeq & 0xFFFFFFFF)
    proto.autoPingPending, proto.autoPingPendingSent = payload, sent
    proto.autoPingTimeoutCall = PONG_DUE if proto.autoPingTimeout > 0 else None
    proto.last_ping = now
    if proto.send_state == proto.SEND_STATE_GROUND and not proto.send_queue:
        send_now(proto.transport, _PING_HEADER + payload)
    else:
        proto.sendPing(payload)


def fast_pong(proto: Any, data: bytes) -> bool:
    """``data`` is exactly one masked pong frame echoing the pending ping, read while no other
    frame is half parsed: the ping is answered (as autobahn's ``processControlFrame`` would
    record it) and True; otherwise False and nothing touched."""
    if (
        len(data) != _PONG_FRAME_LEN
        or data[0] != _PONG_HEADER[0]
        or data[1] != _PONG_HEADER[1]
        or proto.autoPingPending is None
        or proto.state != proto.STATE_OPEN
        or proto.data
        or proto.current_frame is not None
    ):
        return False
    mask = int.from_bytes(data[2:6], "big")
    echoed = int.from_bytes(data[6:], "big") ^ (mask << 64 | mask << 32 | mask)  # unmasked (RFC 6455 5.3)
    if echoed != int.from_bytes(proto.autoPingPending, "big"):
        return False
    proto.autoPingPending = proto.autoPingPendingSent = proto.autoPingTimeoutCall = None
    return True


def install_fast_pong() -> None:
    """daphne's protocol takes a pong answering its ping without autobahn's frame parser
    (``fast_pong``); everything else reaches autobahn's ``dataReceived`` as before."""
    from daphne.ws_protocol import WebSocketProtocol

    if getattr(WebSocketProtocol, "_tyrum_fast_pong", False):
        return
    received = WebSocketProtocol.dataReceived

    def dataReceived(self: Any, data: bytes) -> None:  # noqa: N802  (twisted's name)
        if not fast_pong(self, data):
            received(self, data)

    WebSocketProtocol.dataReceived = dataReceived
    WebSocketProtocol._tyrum_fast_pong = True
