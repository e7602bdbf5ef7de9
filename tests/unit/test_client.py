"""Unit tests of the peer SDK's own logic: no server, no network, every wait bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from backplane import client as client_module
from backplane.client import (
    Backoff,
    ConnectionFailed,
    DedupeCache,
    Event,
    ProtocolViolation,
    Refused,
    Resync,
    TokenExpired,
    TokenRevoked,
    TyrumClient,
    auth_subprotocol,
    build_resume_frame,
)

URL = "ws://edge.test/ws"
TOKEN = "secret-token"
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=5)

    return asyncio.run(bounded())


def hello(**streams: tuple[str, int]) -> dict[str, Any]:
    heads = {name: {"epoch": e, "offset": o} for name, (e, o) in streams.items()}
    return {
        "type": "hello",
        "protocol": "tyrum-v1",
        "connection_id": "c1",
        "edge_id": "e1",
        "streams": heads,
    }


def event(stream: str, epoch: str, offset: int, event_id: str | None = None) -> dict[str, Any]:
    body = {
        "event_id": event_id or f"{stream}-{epoch}-{offset}",
        "type": "run.updated",
        "occurred_at": "2026-11-26T20:00:00Z",
        "payload": {"run_id": "r1"},
    }
    return {"type": "event", "stream": stream, "epoch": epoch, "offset": offset, "event": body}


def make_client(**kwargs: Any) -> TyrumClient:
    kwargs.setdefault("backoff_initial", 0.001)
    kwargs.setdefault("backoff_max", 0.002)
    return TyrumClient(URL, TOKEN, **kwargs)


class FakeConnection:
    """Stands in for a websockets ClientConnection: scripted frames, then a close code."""

    def __init__(self, frames: list[dict[str, Any]], close_code: int | None = 4001) -> None:
        self.subprotocol = "tyrum-v1"
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self._frames = [json.dumps(frame) for frame in frames]
        self._close_code = close_code

    async def recv(self) -> str:
        if self._frames:
            return self._frames.pop(0)
        rcvd = None if self._close_code is None else Close(self._close_code, "")
        raise ConnectionClosed(rcvd, None)

    async def send(self, data: str) -> None:
        self.sent.append(json.loads(data))

    async def close(self) -> None:
        self.closed = True


def script_connect(monkeypatch: pytest.MonkeyPatch, outcomes: list[FakeConnection | Exception]) -> list[dict[str, Any]]:
    """Make ``connect`` play ``outcomes`` in order; return the kwargs of each call."""
    calls: list[dict[str, Any]] = []

    async def fake_connect(url: str, **kwargs: Any) -> FakeConnection:
        calls.append({"url": url, **kwargs})
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(client_module, "connect", fake_connect)
    return calls


async def collect(
    client: TyrumClient, until: Callable[[list[Event | Resync]], bool] | None = None
) -> list[Event | Resync]:
    items: list[Event | Resync] = []
    async with contextlib.aclosing(client.events()) as stream:
        async for item in stream:
            items.append(item)
            if until is not None and until(items):
                break
    return items


def http_error(status: int) -> InvalidStatus:
    return InvalidStatus(Response(status, "refused", Headers()))


# -- DedupeCache -----------------------------------------------------------------------------


def test_dedupe_cache__evicts_least_recently_seen_beyond_capacity() -> None:
    cache = DedupeCache(2)
    assert [cache.seen(i) for i in ("a", "b", "a", "c")] == [False, False, True, False]
    # "b" was the least recently seen when "c" arrived, so it is the one forgotten.
    assert cache.seen("a") is True
    assert cache.seen("b") is False


def test_dedupe_cache__rejects_capacity_below_one() -> None:
    with pytest.raises(ValueError, match="capacity"):
        DedupeCache(0)


def test_client__dedupe_bound_forgets_oldest_event_id() -> None:
    client = make_client(dedupe_capacity=2)
    # Distinct epochs so the per-stream offset rule cannot be what catches the repeat.
    frames = [event("device", f"ep{i}", 1, event_id=f"id{i}") for i in range(3)]
    assert all(len(client._handle_frame(frame)) == 1 for frame in frames)
    assert client._handle_frame(event("device", "ep9", 1, event_id="id2")) == []
    assert client.duplicates == 1
    assert len(client._handle_frame(event("device", "ep8", 1, event_id="id0"))) == 1


# -- Backoff ---------------------------------------------------------------------------------


def test_backoff__caps_double_from_initial_to_maximum() -> None:
    bounds: list[float] = []

    def record(low: float, high: float) -> float:
        assert low == 0
        bounds.append(high)
        return high

    backoff = Backoff(0.5, 30.0, uniform=record)
    for _ in range(9):
        backoff.next_delay()
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff__seeded_delays_stay_within_full_jitter_bounds() -> None:
    backoff = Backoff(0.5, 30.0, uniform=random.Random(1234).uniform)
    caps = [min(0.5 * 2**i, 30.0) for i in range(50)]
    delays = [backoff.next_delay() for _ in caps]
    assert all(0 <= delay <= cap for delay, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    again = Backoff(0.5, 30.0, uniform=random.Random(1234).uniform)
    assert [again.next_delay() for _ in caps] == delays


def test_backoff__reset_returns_to_initial() -> None:
    backoff = Backoff(0.5, 30.0, uniform=lambda low, high: high)
    backoff.next_delay()
    backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.5


# -- Authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["a", "ab", "abc", "tok>>?~é", "x" * 41])
def test_auth_subprotocol__is_unpadded_base64url_of_utf8(token: str) -> None:
    value = auth_subprotocol(token)
    assert value.startswith("tyrum-auth.")
    encoded = value.removeprefix("tyrum-auth.")
    assert "=" not in encoded and "+" not in encoded and "/" not in encoded
    padded = encoded + "=" * (-len(encoded) % 4)
    assert base64.urlsafe_b64decode(padded).decode("utf-8") == token


def test_auth_subprotocol__uses_url_safe_alphabet() -> None:
    # b">>>" is "Pj4+" and b"???" is "Pz8/" in the standard alphabet.
    assert auth_subprotocol(">>>???") == "tyrum-auth.Pj4-Pz8_"


def test_client__header_auth_sends_bearer_and_offers_tyrum_v1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = script_connect(monkeypatch, [http_error(403)])
    with pytest.raises(Refused):
        run(collect(make_client()))
    assert calls[0]["url"] == URL
    assert calls[0]["subprotocols"] == ["tyrum-v1"]
    assert calls[0]["additional_headers"] == {"Authorization": f"Bearer {TOKEN}"}


def test_client__subprotocol_auth_offers_token_after_tyrum_v1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = script_connect(monkeypatch, [http_error(403)])
    with pytest.raises(Refused):
        run(collect(make_client(auth="subprotocol")))
    assert calls[0]["subprotocols"] == ["tyrum-v1", auth_subprotocol(TOKEN)]
    assert calls[0]["additional_headers"] == {}
    assert TOKEN not in calls[0]["url"]


def test_client__wire_logger_never_logs_at_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    # websockets dumps upgrade headers (the token) and frames at DEBUG through this logger.
    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    calls = script_connect(monkeypatch, [http_error(403)])
    with pytest.raises(Refused):
        run(collect(make_client()))
    assert not calls[0]["logger"].isEnabledFor(logging.DEBUG)


@pytest.mark.parametrize("query", ["token=x", "Access_Token=x", "a=1&JWT=x"])
def test_client__url_carrying_a_credential_is_rejected(query: str) -> None:
    with pytest.raises(ValueError, match="credential"):
        TyrumClient(f"{URL}?{query}", TOKEN)


# -- Resume ----------------------------------------------------------------------------------


def test_build_resume_frame__names_every_stream_with_epoch_and_offset() -> None:
    frame = build_resume_frame({"tenant": ("9f1c2a7e", 41), "device": ("c0ffee01", 7)})
    assert frame == {
        "type": "resume",
        "streams": {
            "tenant": {"epoch": "9f1c2a7e", "offset": 41},
            "device": {"epoch": "c0ffee01", "offset": 7},
        },
    }


def test_build_resume_frame__none_without_state() -> None:
    assert build_resume_frame({}) is None


def test_client__first_hello_adopts_heads_and_queues_no_resume() -> None:
    client = make_client()
    assert client._handle_frame(hello(tenant=("t1", 41), device=("d1", 7))) == []
    assert client._pending_resume is None
    assert client.streams == {"tenant": ("t1", 41), "device": ("d1", 7)}
    assert client.heads == client.streams
    assert (client.connection_id, client.edge_id) == ("c1", "e1")


def test_client__later_hello_queues_resume_with_stored_epoch_even_if_changed() -> None:
    client = make_client()
    client.load_state({"device": {"epoch": "old", "offset": 7}})
    client._handle_frame(hello(device=("new", 3), role=("r1", 0)))
    assert client._pending_resume == {
        "type": "resume",
        "streams": {"device": {"epoch": "old", "offset": 7}},
    }
    assert client.streams["role"] == ("r1", 0)


def test_client__resumed_not_recovered_yields_resync_and_adopts_head() -> None:
    client = make_client()
    client.load_state({"device": {"epoch": "old", "offset": 7}})
    client._handle_frame(hello(device=("new", 3)))
    items = client._handle_frame(
        {"type": "resumed", "streams": {"device": {"recovered": False, "reason": "epoch_changed"}}}
    )
    assert items == [Resync(stream="device", reason="epoch_changed")]
    assert client.streams["device"] == ("new", 3)
    assert client.last_resumed == {"device": {"recovered": False, "reason": "epoch_changed"}}
    assert client._handle_frame(event("device", "new", 4))[0].offset == 4  # type: ignore[union-attr]


def test_client__resumed_not_recovered_keeps_live_events_past_the_head() -> None:
    client = make_client()
    client.load_state({"device": {"epoch": "old", "offset": 7}})
    client._handle_frame(hello(device=("new", 3)))
    client._handle_frame(event("device", "new", 4))  # live, before the resumed frame
    client._handle_frame({"type": "resumed", "streams": {"device": {"recovered": False}}})
    assert client.streams["device"] == ("new", 4)


def test_client__offset_ahead_does_not_drop_live_events() -> None:
    client = make_client()
    client.load_state({"device": {"epoch": "e", "offset": 50}})
    client._handle_frame(hello(device=("e", 10)))
    assert client._pending_resume is not None
    assert client._pending_resume["streams"]["device"]["offset"] == 50
    assert len(client._handle_frame(event("device", "e", 11))) == 1


def test_client__events_up_to_hello_head_are_replayed_then_live() -> None:
    client = make_client()
    client.load_state({"device": {"epoch": "e", "offset": 7}})
    client._handle_frame(hello(device=("e", 9)))
    items = [client._handle_frame(event("device", "e", n))[0] for n in (8, 9, 10)]
    assert [item.replayed for item in items if isinstance(item, Event)] == [True, True, False]
    resumed = {"type": "resumed", "streams": {"device": {"recovered": True, "replayed": 2}}}
    assert client._handle_frame(resumed) == []
    assert client.replayed == 2
    assert client.streams["device"] == ("e", 10)


# -- Events ----------------------------------------------------------------------------------


def test_client__event_at_or_below_last_offset_is_a_duplicate() -> None:
    client = make_client()
    client._handle_frame(hello(device=("e", 7)))
    assert client._handle_frame(event("device", "e", 7, event_id="fresh")) == []
    assert client._handle_frame(event("device", "e", 5, event_id="fresher")) == []
    assert client.duplicates == 2
    assert client.streams["device"] == ("e", 7)


def test_client__event_id_seen_before_is_a_duplicate() -> None:
    client = make_client()
    client._handle_frame(hello(device=("e", 0), tenant=("t", 0)))
    assert len(client._handle_frame(event("device", "e", 1, event_id="same"))) == 1
    assert client._handle_frame(event("tenant", "t", 1, event_id="same")) == []
    assert client.duplicates == 1


def test_client__event_fields_come_from_the_frame() -> None:
    client = make_client()
    client._handle_frame(hello(device=("c0ffee01", 7)))
    [item] = client._handle_frame(event("device", "c0ffee01", 8, event_id="ev-8"))
    assert item == Event(
        stream="device",
        epoch="c0ffee01",
        offset=8,
        event_id="ev-8",
        type="run.updated",
        occurred_at="2026-11-26T20:00:00Z",
        payload={"run_id": "r1"},
        replayed=False,
    )


@pytest.mark.parametrize(
    "frame",
    [{}, {"type": "pong"}, {"type": "future.thing"}, {"type": "event", "stream": "device"}],
)
def test_client__unknown_or_malformed_frames_are_ignored(frame: dict[str, Any]) -> None:
    client = make_client()
    assert client._handle_frame(frame) == []
    assert client.streams == {}


# -- State -----------------------------------------------------------------------------------


def test_client__state_round_trips_through_json() -> None:
    client = make_client()
    client._handle_frame(hello(tenant=("t", 41), device=("d", 7)))
    restored = make_client()
    restored.load_state(json.loads(json.dumps(client.state())))
    assert restored.streams == client.streams


@pytest.mark.parametrize(
    "state",
    [
        {"device": {"epoch": 1, "offset": 7}},
        {"device": {"epoch": "e", "offset": -1}},
        {"device": {"epoch": "e", "offset": True}},
        {"device": {"epoch": "e"}},
        {"device": "e:7"},
    ],
)
def test_client__load_state_rejects_invalid_positions(state: dict[str, Any]) -> None:
    client = make_client()
    with pytest.raises(ValueError, match="device"):
        client.load_state(state)


# -- Connection loop (scripted connect, no server) -------------------------------------------


def test_events__reconnect_sends_resume_as_first_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    first = FakeConnection([hello(device=("e", 7)), event("device", "e", 8)], close_code=1006)
    second = FakeConnection([hello(device=("e", 8))], close_code=4008)
    script_connect(monkeypatch, [first, second])
    client = make_client()
    items: list[Event | Resync] = []

    async def consume() -> None:
        async for item in client.events():
            items.append(item)

    with pytest.raises(TokenRevoked):
        run(consume())
    assert first.sent == []
    assert second.sent == [{"type": "resume", "streams": {"device": {"epoch": "e", "offset": 8}}}]
    assert [item.offset for item in items if isinstance(item, Event)] == [8]
    assert client.reconnects == 1
    assert first.closed and second.closed


def test_events__4409_yields_resync_and_reconnects_without_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = FakeConnection([hello(device=("e", 7))], close_code=4409)
    second = FakeConnection([hello(device=("e2", 0))], close_code=4401)
    script_connect(monkeypatch, [first, second])
    client = make_client()
    items: list[Event | Resync] = []

    async def consume() -> None:
        async for item in client.events():
            items.append(item)

    with pytest.raises(TokenExpired):
        run(consume())
    assert items == [Resync(stream=None, reason="resync_required")]
    assert second.sent == []
    assert client.streams == {"device": ("e2", 0)}


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (4008, TokenRevoked),
        (4401, TokenExpired),
        (4400, ProtocolViolation),
        (4009, ProtocolViolation),
    ],
)
def test_events__fatal_close_code_raises_named_error(
    monkeypatch: pytest.MonkeyPatch, code: int, error: type[Exception]
) -> None:
    calls = script_connect(monkeypatch, [FakeConnection([hello()], close_code=code)])
    with pytest.raises(error, match=str(code)):
        run(collect(make_client()))
    assert len(calls) == 1


@pytest.mark.parametrize("code", [4001, 4013, 4029, 1001, 1011, None])
def test_events__transient_close_reconnects(monkeypatch: pytest.MonkeyPatch, code: int | None) -> None:
    last = FakeConnection([hello()], close_code=4008)
    calls = script_connect(monkeypatch, [FakeConnection([hello()], close_code=code), last])
    with pytest.raises(TokenRevoked):
        run(collect(make_client()))
    assert len(calls) == 2


def test_events__throttle_close_keeps_growing_backoff_until_a_clean_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []

    async def record_sleep(self: TyrumClient, delay: float) -> None:
        delays.append(delay)

    monkeypatch.setattr(TyrumClient, "_sleep", record_sleep)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    codes: list[int | Exception] = [4013, 4029, 4001, OSError("down"), 4008]
    outcomes: list[FakeConnection | Exception] = [
        code if isinstance(code, Exception) else FakeConnection([hello()], close_code=code) for code in codes
    ]
    script_connect(monkeypatch, outcomes)
    with pytest.raises(TokenRevoked):
        run(collect(make_client(backoff_initial=1.0, backoff_max=8.0)))
    # 4013 and 4029 ask us to slow down: no reset; 4001 after a hello resets; a failure doubles.
    assert delays == [1.0, 2.0, 1.0, 2.0]


def test_events__503_retries_until_max_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = script_connect(monkeypatch, [http_error(503), OSError("refused"), http_error(503)])
    with pytest.raises(ConnectionFailed) as info:
        run(collect(make_client(max_attempts=3)))
    assert len(calls) == 3
    assert isinstance(info.value.__cause__, InvalidStatus)


def test_events__403_raises_refused_without_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = script_connect(monkeypatch, [http_error(403), http_error(503)])
    with pytest.raises(Refused, match="403"):
        run(collect(make_client()))
    assert len(calls) == 1


def test_events__closing_the_iterator_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = FakeConnection([hello(device=("e", 0)), event("device", "e", 1)], close_code=4008)
    script_connect(monkeypatch, [conn])
    items = run(collect(make_client(), until=lambda items: len(items) == 1))
    assert len(items) == 1
    assert conn.closed


def test_client__late_replay_after_live_events_is_yielded_not_dropped() -> None:
    """Under load a resume can reach the edge after its 300 ms hold: live events (past the
    head) then arrive before the replay. The replayed events are new, so they are yielded;
    events at or below what the peer had processed stay duplicates."""
    client = make_client()
    client.load_state({"device": {"epoch": "e", "offset": 5}})
    client._handle_frame(hello(device=("e", 8)))
    live = client._handle_frame(event("device", "e", 9))
    late = [client._handle_frame(event("device", "e", o)) for o in (6, 7, 8)]
    covered = client._handle_frame(event("device", "e", 5))
    again = client._handle_frame(event("device", "e", 9))

    assert [e.offset for e in live] == [9]  # type: ignore[union-attr]
    assert [[e.offset for e in got] for got in late] == [[6], [7], [8]]  # type: ignore[union-attr]
    assert covered == [] and again == []
    assert client.duplicates == 2
    assert client.state()["device"] == {"epoch": "e", "offset": 9}


def test_client__imports_neither_django_nor_the_server() -> None:
    """The SDK installs without Django: it and the protocol module import neither."""
    import subprocess
    import sys

    code = (
        "import sys, backplane.client, backplane.protocol; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'channels', 'daphne') "
        "or m in ('backplane.models', 'backplane.conf')); print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
