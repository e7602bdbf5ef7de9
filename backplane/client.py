"""Python peer SDK for the Tyrum backplane (wire protocol ``tyrum-v1``).

Usage::

    client = TyrumClient("wss://edge.example/ws", token)
    async for item in client.events():
        if isinstance(item, Resync):
            await refetch_durable_state(item.stream)  # None means every stream
        else:
            apply(item)  # an Event; at-least-once upstream, deduplicated here

``events()`` connects, reconnects with full-jitter backoff and resumes each stream from the last
offset it yielded; it raises a ``ClientError`` subclass when reconnecting cannot help. Persist
``state()`` and pass it to ``load_state()`` to resume across process restarts. The module has no
Django imports so peers can use it alone; it never logs a token, a payload or a header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from backplane import protocol
from backplane.protocol import Close

logger = logging.getLogger(__name__)
# websockets logs upgrade headers (the token) and frames (payloads) at DEBUG; its logger here is
# pinned at INFO so that a root logger at DEBUG cannot leak them.
wire_logger = logging.getLogger(f"{__name__}.websockets")
wire_logger.setLevel(logging.INFO)

SUBPROTOCOL = protocol.PROTOCOL
AUTH_SUBPROTOCOL_PREFIX = protocol.AUTH_SUBPROTOCOL_PREFIX
# The server's list: such a URL is refused whatever else the request carries.
CREDENTIAL_PARAMS = protocol.URL_CREDENTIAL_PARAMS
ABNORMAL_CLOSE_CODE = Close.ABNORMAL  # what websockets reports when no close frame arrived
RESYNC_CLOSE_CODE = Close.RESYNC
# The server asked us to slow down, so a session ending with these does not reset the backoff.
THROTTLE_CLOSE_CODES = protocol.THROTTLE_CLOSES
# 408 and 429 are the only 4xx statuses that can succeed on retry; 5xx (503 = db down) all can.
RETRYABLE_4XX_STATUSES = frozenset({408, 429})

StreamPosition = tuple[str, int]  # (epoch, last offset)
Uniform = Callable[[float, float], float]


class ClientError(Exception):
    """Raised for every failure the peer SDK reports; the root of all below."""


class ConnectionFailed(ClientError):
    """Raised when ``max_attempts`` consecutive connection attempts failed."""


class Refused(ClientError):
    """Raised when the edge refuses the upgrade with HTTP 403 (or another final 4xx)."""


class TokenRevoked(ClientError):
    """Raised when the edge closes with 4008: token revoked or tenant deactivated."""


class TokenExpired(ClientError):
    """Raised when the edge closes with 4401: the token expired while connected."""


class ProtocolViolation(ClientError):
    """Raised when the edge closes with 4400/4009/1009 or does not speak ``tyrum-v1``."""


class NotConnected(ClientError):
    """Raised when sending a frame while no connection is open."""


FATAL_CLOSE_CODES: dict[int, type[ClientError]] = {
    Close.POLICY: TokenRevoked,
    Close.TOKEN_EXPIRED: TokenExpired,
    Close.MALFORMED_FRAME: ProtocolViolation,
    Close.FRAME_TOO_LARGE: ProtocolViolation,
    Close.MESSAGE_TOO_BIG: ProtocolViolation,
}


@dataclass(frozen=True)
class Event:
    """One event of one stream; ``replayed`` is True when it came from a resume's replay."""

    stream: str
    epoch: str
    offset: int
    event_id: str
    type: str
    occurred_at: str
    payload: Any
    replayed: bool = False


@dataclass(frozen=True)
class Resync:
    """Tell the caller to refetch durable state for ``stream`` (``None``: every stream)."""

    stream: str | None
    reason: str


class DedupeCache:
    """Remember the most recent ``capacity`` event ids, evicting the least recently seen."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("dedupe capacity must be at least 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        """Record ``event_id``; return True if it was already remembered."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False


class Backoff:
    """Full-jitter exponential backoff: sleep uniform(0, current), then double up to a cap."""

    def __init__(self, initial: float, maximum: float, uniform: Uniform | None = None) -> None:
        self.initial, self.maximum, self.current = initial, maximum, initial
        self._uniform = uniform or random.uniform

    def next_delay(self) -> float:
        delay = self._uniform(0, self.current)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


def auth_subprotocol(token: str) -> str:
    """Return ``tyrum-auth.<token as unpadded base64url>`` (RFC 4648 §5)."""
    encoded = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii").rstrip("=")
    return AUTH_SUBPROTOCOL_PREFIX + encoded


def build_resume_frame(streams: dict[str, StreamPosition]) -> dict[str, Any] | None:
    """Return the ``resume`` frame naming every stream in ``streams``, or None if there are none."""
    if not streams:
        return None
    positions = {name: {"epoch": e, "offset": o} for name, (e, o) in streams.items()}
    return {"type": "resume", "streams": positions}


def parse_positions(raw: Any) -> dict[str, StreamPosition]:
    """Parse ``{name: {"epoch": str, "offset": int >= 0}}``.

    Raise TypeError if ``raw`` is not a dict and ValueError if a position is invalid.
    """
    if not isinstance(raw, dict):
        raise TypeError("stream positions must be an object")
    positions: dict[str, StreamPosition] = {}
    for name, value in raw.items():
        epoch = value.get("epoch") if isinstance(value, dict) else None
        offset = value.get("offset") if isinstance(value, dict) else None
        if not isinstance(name, str) or not isinstance(epoch, str) or type(offset) is not int or offset < 0:
            raise ValueError(f"invalid position for stream {name!r}")
        positions[name] = (epoch, offset)
    return positions


class TyrumClient:
    """A ``tyrum-v1`` peer: one connection at a time, per-stream resume, deduplicated events."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        auth: str = "header",
        dedupe_capacity: int = 10_000,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_attempts: int | None = None,
        open_timeout: float = 10.0,
    ) -> None:
        parse_uri(url)  # fail early on a malformed URL
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
        if any(key.lower() in CREDENTIAL_PARAMS for key, _ in query):
            raise ValueError("the URL must not carry a credential; pass token= instead")
        if auth not in ("header", "subprotocol"):
            raise ValueError("auth must be 'header' or 'subprotocol'")
        self._url = url
        self._token = token
        self._auth = auth
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_attempts = max_attempts
        self._open_timeout = open_timeout
        self._dedupe = DedupeCache(dedupe_capacity)
        self._closed = asyncio.Event()
        self._running = False
        self._ws: ClientConnection | None = None
        self._ever_connected = False
        self._close_code: int = ABNORMAL_CLOSE_CODE
        self.connection_id: str | None = None
        self.edge_id: str | None = None
        self.heads: dict[str, StreamPosition] = {}
        self.last_resumed: dict[str, Any] | None = None
        self.streams: dict[str, StreamPosition] = {}
        self.duplicates = 0
        self.reconnects = 0
        self.replayed = 0  # total events the server reported replaying across all resumes
        self._reset_session()

    def state(self) -> dict[str, dict[str, Any]]:
        """Return the per-stream positions as JSON-ready ``{name: {"epoch", "offset"}}``."""
        return {name: {"epoch": e, "offset": o} for name, (e, o) in self.streams.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace the per-stream positions with ``state`` (as returned by ``state()``)."""
        self.streams = parse_positions(state)

    def _reset_session(self) -> None:
        self._hello_seen = False
        self._pending_resume: dict[str, Any] | None = None
        self._replay_heads: dict[str, int] = {}  # streams named in resume -> head offset at hello
        self._floors: dict[str, tuple[str, int]] = {}  # stream -> (epoch, offset covered already)

    def _handle_frame(self, frame: dict[str, Any]) -> list[Event | Resync]:
        """Apply one server frame to the client state; return what to hand to the caller."""
        kind = frame.get("type")
        try:
            if kind == "hello":
                self._on_hello(frame)
            elif kind == "event":
                return self._on_event(frame)
            elif kind == "resumed":
                return self._on_resumed(frame)
            elif kind == "error":  # e.g. resume_not_first: a bug here, worth a log line
                logger.warning("edge error %s", frame.get("code"), extra={"action": "edge_error"})
            elif kind != "pong":  # tolerated, so the edge can extend the protocol
                logger.debug("ignored %r frame", kind, extra={"action": "ignored_frame"})
        except (KeyError, TypeError, ValueError):
            logger.warning("malformed %r frame", kind, extra={"action": "malformed_frame"})
        return []

    def _on_hello(self, frame: dict[str, Any]) -> None:
        heads = parse_positions(frame["streams"])
        self.connection_id = str(frame.get("connection_id"))
        self.edge_id = str(frame.get("edge_id"))
        self.heads = heads
        self._hello_seen = True
        # Resume with what we hold, even if the epoch changed: the server answers epoch_changed.
        self._pending_resume = build_resume_frame(self.streams)
        self._replay_heads = {name: heads[name][1] for name in self.streams if name in heads}
        # Below the floor everything is covered: by what we processed (resumed streams) or by
        # the durable state a fresh peer loads after reading the heads.
        self._floors = {
            name: (epoch, min(self.streams[name][1], offset) if name in self._replay_heads else offset)
            for name, (epoch, offset) in heads.items()
        }
        for name, (epoch, offset) in heads.items():
            current = self.streams.get(name)
            # A stored offset beyond the head (offset_ahead) would drop live events as duplicates.
            if current is None or (current[0] == epoch and current[1] > offset):
                self.streams[name] = (epoch, offset)

    def _on_event(self, frame: dict[str, Any]) -> list[Event | Resync]:
        body = frame["event"]
        stream, epoch, offset = str(frame["stream"]), str(frame["epoch"]), int(frame["offset"])
        # Exactly the range (offset, head at hello] is replay; anything later is live.
        replay_head = self._replay_heads.get(stream)
        event = Event(
            stream=stream,
            epoch=epoch,
            offset=offset,
            event_id=str(body["event_id"]),
            type=str(body["type"]),
            occurred_at=str(body["occurred_at"]),
            payload=body.get("payload"),
            replayed=replay_head is not None and offset <= replay_head,
        )
        last_epoch, last_offset = self.streams.get(stream, (None, -1))
        same_epoch = last_epoch == epoch
        if self._dedupe.seen(event.event_id):
            self.duplicates += 1
            return []
        floor = self._floors.get(stream)
        if floor is not None and floor[0] == epoch and offset <= floor[1]:
            self.duplicates += 1
            return []
        if same_epoch and offset <= last_offset:
            # Not seen, above the floor, yet below our position: a replay that arrived after
            # live events (the resume reached the edge after its 300 ms hold). Yield it.
            return [event]
        if same_epoch and offset != last_offset + 1 and stream not in self._replay_heads:
            logger.warning("gap in stream %s before %d", stream, offset, extra={"action": "gap"})
        self.streams[stream] = (epoch, offset)
        return [event]

    def _on_resumed(self, frame: dict[str, Any]) -> list[Event | Resync]:
        results = frame["streams"]
        self.last_resumed = dict(results)
        self._replay_heads = {}
        out: list[Event | Resync] = []
        for name, result in results.items():
            if result.get("recovered") is True:
                self.replayed += int(result.get("replayed", 0))
                continue
            reason = str(result.get("reason", "unknown"))
            logger.info("stream %s not recovered: %s", name, reason, extra={"action": "resync"})
            out.append(Resync(stream=name, reason=reason))
            head = self.heads.get(name)
            current = self.streams.get(name)
            if head is None:
                self.streams.pop(name, None)
            elif current is None or current[0] != head[0] or current[1] < head[1]:
                self.streams[name] = head  # keep live events that already passed the head
        return out

    async def events(self) -> AsyncGenerator[Event | Resync, None]:
        """Yield events and resyncs, reconnecting and resuming, until ``close()`` or a ClientError.

        Delivery is at-least-once from the server and deduplicated here by event id and by
        per-stream offset, so each event is yielded once per process (within the LRU bound).
        """
        if self._running:
            raise RuntimeError("events() is already being iterated")
        self._running = True
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        failures = 0
        last_error: BaseException | None = None
        try:
            while not self._closed.is_set():
                try:
                    ws = await self._open()
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    failures, last_error = failures + 1, exc
                    name = type(exc).__name__
                    logger.warning("cannot connect: %s", name, extra={"action": "connect_failed"})
                else:
                    async with contextlib.aclosing(self._session(ws)) as session:
                        async for item in session:
                            yield item
                    if self._closed.is_set():
                        return
                    code = self._close_code
                    logger.info("closed with %d", code, extra={"action": "disconnected"})
                    fatal = FATAL_CLOSE_CODES.get(code)
                    if fatal is not None:
                        raise fatal(f"edge closed the connection with {code}")
                    if self._hello_seen and code not in THROTTLE_CLOSE_CODES:
                        backoff.reset()
                    failures = 0 if self._hello_seen else failures + 1
                    if code == RESYNC_CLOSE_CODE:
                        self.streams.clear()
                        yield Resync(stream=None, reason="resync_required")
                if self._max_attempts is not None and failures >= self._max_attempts:
                    msg = f"{failures} consecutive connection attempts failed"
                    raise ConnectionFailed(msg) from last_error
                await self._sleep(backoff.next_delay())
        finally:
            self._running = False

    async def _open(self) -> ClientConnection:
        """Open one connection; raise Refused for a final refusal, else the retryable error."""
        subprotocols = [Subprotocol(SUBPROTOCOL)]
        headers: dict[str, str] = {}
        if self._auth == "subprotocol":
            subprotocols.append(Subprotocol(auth_subprotocol(self._token)))
        else:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            return await connect(
                self._url,
                subprotocols=subprotocols,
                additional_headers=headers,
                open_timeout=self._open_timeout,
                logger=wire_logger,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            logger.warning("upgrade answered HTTP %d", status, extra={"action": "refused"})
            if status < 500 and status not in RETRYABLE_4XX_STATUSES:
                raise Refused(f"edge refused the upgrade with HTTP {status}") from exc
            raise

    async def _session(self, ws: ClientConnection) -> AsyncGenerator[Event | Resync, None]:
        """Run one connection, yielding its items; leave its close code in ``_close_code``."""
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._ws, self._close_code = ws, ABNORMAL_CLOSE_CODE
        self._reset_session()
        try:
            if ws.subprotocol != SUBPROTOCOL:
                raise ProtocolViolation(f"edge accepted subprotocol {ws.subprotocol!r}")
            while not self._closed.is_set():  # close() may have run while we were connecting
                items = self._handle_frame(_decode(await ws.recv()))
                if self._pending_resume is not None:  # set by hello: must be our first frame
                    await ws.send(json.dumps(self._pending_resume))
                    self._pending_resume = None
                for item in items:
                    yield item
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self._close_code = exc.rcvd.code
        finally:
            self._ws = None
            await ws.close()

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, waking early if ``close()`` is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout=delay)

    async def ping(self) -> None:
        """Send ``{"type": "ping"}``; the edge answers with a pong frame."""
        if self._ws is None:
            raise NotConnected("no open connection")
        await self._ws.send(protocol.PING_FRAME)

    async def close(self) -> None:
        """Close the connection with 1000 and make ``events()`` return."""
        self._closed.set()
        if self._ws is not None:
            await self._ws.close()

    async def drop_connection(self) -> None:
        """Abort the TCP connection without a close frame (for tests): ``events()`` resumes."""
        if self._ws is not None:
            self._ws.transport.abort()


def _decode(raw: str | bytes) -> dict[str, Any]:
    """Decode a text frame to a JSON object; anything else becomes an empty, ignored frame."""
    try:
        frame = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        frame = None
    if not isinstance(frame, dict):
        logger.warning("ignoring a frame that is not a JSON object", extra={"action": "malformed_frame"})
        return {}
    return frame
