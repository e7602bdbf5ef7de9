"""The edge's WebSocket pings (backplane/vendor/keepalive.py, docs/decisions/0033) on daphne's
own protocol object: one sweep pings the due sockets and closes those whose pong is late; a
pong answering the ping skips autobahn's parser, everything else goes through it.
tests/e2e/test_keepalive.py runs the same on a real edge with a raw client."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

from backplane.vendor import keepalive
from tests.unit.test_vendor import daphne_protocol


def masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.fixture
def proto(monkeypatch: Any) -> Any:
    """An open WebSocket of a server pinging every 20 s, pong timeout 30 s; reactor timers
    recorded, not run; autobahn's parser recorded (and still run)."""
    from daphne.ws_protocol import WebSocketProtocol
    from twisted.internet import reactor

    keepalive.install_fast_pong()
    monkeypatch.setattr(reactor, "callLater", lambda delay, f, *a: SimpleNamespace(delay=delay, f=f))
    p = daphne_protocol()
    p.server = SimpleNamespace(ping_interval=20, websocket_timeout=86400)
    p.state, p.autoPingTimeout, p.socket_opened, p.last_ping = p.STATE_OPEN, 30, time.time(), time.time()
    p.inside_message, p.current_frame, p.websocket_version = False, None, 13  # as the handshake leaves them
    p.received = []
    p.application_queue, p.client_addr = SimpleNamespace(put_nowait=p.received.append), None
    p.parsed = []
    parse = WebSocketProtocol._dataReceived
    monkeypatch.setattr(p, "_dataReceived", lambda data: (p.parsed.append(data), parse(p, data)))
    p.transport.clear()
    return p


def ping(p: Any) -> bytes:
    keepalive.send_ping(p, time.time())
    wire = p.transport.value()
    p.transport.clear()
    assert wire == b"\x89\x0c" + p.autoPingPending  # one unmasked ping frame, autobahn's payload
    assert keepalive.pong_pending(p)
    return wire[2:]


def test_fast_pong__the_pong_answering_the_ping_skips_autobahns_parser(proto: Any) -> None:
    payload = ping(proto)
    proto.dataReceived(masked(10, payload))
    assert proto.parsed == [] and not keepalive.pong_pending(proto)
    assert proto.autoPingPending is None and proto.autoPingTimeoutCall is None


def test_fast_pong__another_payload_goes_to_autobahn_and_leaves_the_ping_unanswered(proto: Any) -> None:
    payload = ping(proto)
    wrong = masked(10, bytes([payload[0] ^ 1]) + payload[1:])
    proto.dataReceived(wrong)
    assert proto.parsed == [wrong] and keepalive.pong_pending(proto)


@pytest.mark.parametrize("how", ["split", "with a frame", "after a frame's header"])
def test_fast_pong__anything_else_goes_to_autobahn(proto: Any, how: str) -> None:
    payload = ping(proto)
    pong = masked(10, payload)
    text = masked(1, b'{"type": "ping"}')
    reads = {
        "split": [pong[:3], pong[3:]],
        "with a frame": [pong + text],
        "after a frame's header": [bytes((0x82, 0x80 | len(pong))) + b"\0\0\0\0", pong],  # a binary frame's payload
    }[how]
    for data in reads:
        proto.dataReceived(data)
    assert proto.parsed == reads  # every read through autobahn's parser
    # autobahn's parser answers the ping with the pong it reads whole (or, as ever, with any
    # data frame).
    assert not keepalive.pong_pending(proto)
    if how == "after a frame's header":  # the bytes were the frame's payload, not a pong
        assert [m.get("bytes") for m in proto.received] == [pong]


def test_keepalive__pings_when_due_and_closes_when_the_pong_is_late(proto: Any) -> None:
    sweep = keepalive.keepalive(proto.server)
    closed: list[bool] = []
    proto.onAutoPingTimeout = lambda: closed.append(True)
    now = time.time()
    proto.last_ping = now - 5
    sweep.visit(proto, now)
    assert proto.transport.value() == b"" and _next_visit(sweep, proto) == pytest.approx(15, abs=0.3)
    proto.last_ping = now - 21
    sweep.visit(proto, now)
    assert proto.transport.value()[:1] == b"\x89" and keepalive.pong_pending(proto)
    assert _next_visit(sweep, proto) == pytest.approx(20, abs=0.3)
    proto.transport.clear()
    sweep.visit(proto, now + 20)  # unanswered: no second ping, the deadline next
    assert proto.transport.value() == b"" and not closed
    assert _next_visit(sweep, proto) == pytest.approx(10, abs=0.3)
    sweep.visit(proto, now + 30.01)
    assert closed == [True]


def test_keepalive__an_answered_ping_means_the_next_one_an_interval_later(proto: Any) -> None:
    sweep = keepalive.keepalive(proto.server)
    proto.last_ping = time.time() - 21
    sweep.visit(proto, time.time())
    proto.dataReceived(masked(10, proto.autoPingPending))
    proto.transport.clear()
    sweep.visit(proto, time.time() + 10)
    assert proto.transport.value() == b""  # not due yet
    sweep.visit(proto, time.time() + 20.1)
    assert proto.transport.value()[:1] == b"\x89"


def _recording(proto: Any, monkeypatch: Any) -> tuple[keepalive.Keepalive, list[Any], list[float]]:
    """The server's sweep on an empty wheel and a clock of its own; its visits recorded, not run."""
    sweep = keepalive.keepalive(proto.server)
    visited: list[Any] = []
    monkeypatch.setattr(sweep, "visit", lambda p, now: visited.append(p))
    clock = [1000.0]
    monkeypatch.setattr(keepalive.time, "monotonic", lambda: clock[0])
    sweep.slot = int(clock[0] / keepalive.SWEEP_SECS)
    sweep.wheel.clear()
    return sweep, visited, clock


def test_keepalive__one_sweep_visits_the_sockets_due_in_its_slots(proto: Any, monkeypatch: Any) -> None:
    sweep, visited, clock = _recording(proto, monkeypatch)
    a, b, c = object(), object(), object()
    sweep.watch(a, 0)  # at the next slot at the earliest
    sweep.watch(b, 1)
    sweep.watch(c, 20)
    clock[0] += keepalive.SWEEP_SECS
    sweep.sweep()
    assert visited == [a]
    clock[0] += 1
    sweep.sweep()
    assert visited == [a, b] and sweep.call is not None  # c still waits: the timer stays armed
    clock[0] += 3600  # a stalled loop: what is due, once
    sweep.sweep()
    assert visited == [a, b, c] and not sweep.wheel


def test_keepalive__a_sweep_visits_at_most_a_batch_per_turn_of_the_loop(proto: Any, monkeypatch: Any) -> None:
    """The due sockets beyond VISITS_PER_TURN wait for the loop's next turn (a zero-delay
    reactor call), in order; a sweep meanwhile adds its own behind them (docs/decisions/0040)."""
    sweep, visited, clock = _recording(proto, monkeypatch)
    batch = keepalive.VISITS_PER_TURN
    first = [object() for _ in range(2 * batch + 1)]
    for p in first:
        sweep.watch(p, 0)
    clock[0] += keepalive.SWEEP_SECS
    sweep.sweep()
    assert visited == first[:batch] and sweep.more.delay == 0
    later = object()
    sweep.watch(later, 0)
    clock[0] += keepalive.SWEEP_SECS
    sweep.sweep()  # the next turn's call is pending: this sweep's socket queues behind
    assert visited == first[:batch]
    turns = 0
    while sweep.more is not None and turns < 10:
        sweep.more.f()
        turns += 1
    assert visited == [*first, later] and turns == 2 and not sweep.due


def test_keepalive__one_timer_for_the_wheel_however_many_sockets_are_visited(proto: Any, monkeypatch: Any) -> None:
    from twisted.internet import reactor

    armed: list[Any] = []
    monkeypatch.setattr(reactor, "callLater", lambda delay, f, *a: armed.append(f) or SimpleNamespace())
    sweep = keepalive.keepalive(proto.server)
    others = [SimpleNamespace(state=0, STATE_OPEN=1) for _ in range(3)]  # closed: visited, dropped
    for p in [proto, *others]:
        sweep.watch(p, 0)
    assert len(armed) == 1
    for _ in range(3):
        clock = time.monotonic() + keepalive.SWEEP_SECS
        monkeypatch.setattr(keepalive.time, "monotonic", lambda clock=clock: clock)
        fired, sweep.call = armed.pop(), None  # the reactor runs the timer
        fired()
        assert len(armed) == 1  # re-armed once: proto (open) waits in the wheel again


def _next_visit(sweep: keepalive.Keepalive, proto: Any) -> float:
    """Seconds from now to the slot ``proto`` waits in (removing it from the wheel)."""
    for slot, bucket in sweep.wheel.items():
        if proto in bucket:
            bucket.remove(proto)
            return slot * keepalive.SWEEP_SECS - time.monotonic()
    raise AssertionError("not in the wheel")
