"""The wire protocol ``tyrum-v1`` (docs/protocol.md): names, close codes, frames.

Shared by the server (``consumers.py``, ``edge.py``) and the Python peer SDK (``client.py``),
so it imports nothing from Django and needs nothing but the standard library: the SDK installs
without Django. With orjson installed (the server pins it), frames are rendered and parsed with
it, 3–5× faster (docs/decisions/0031-speed-libraries.md); without it, with ``json``, to the
same bytes and the same refusals.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

try:
    import orjson
except ImportError:  # the SDK without the server's dependencies
    orjson = None  # type: ignore[assignment]

PROTOCOL = "tyrum-v1"
# A browser cannot set headers on a WebSocket upgrade: the token travels as a subprotocol,
# ``tyrum-auth.<token as unpadded base64url>``.
AUTH_SUBPROTOCOL_PREFIX = "tyrum-auth."
# Query parameters that carry a credential: an upgrade URL holding one is refused whatever
# else the request carries (URLs end up in logs and browser history).
URL_CREDENTIAL_PARAMS = frozenset({"token", "access_token", "auth", "authorization", "api_key", "jwt"})
# The names of a connection's streams on the wire.
STREAM_NAMES = ("tenant", "role", "device")


class Close(enum.IntEnum):
    """Close codes the edge sends (docs/protocol.md, "Close codes"), and two of the
    WebSocket layer's own that a peer may see."""

    NORMAL = 1000
    # What a client library reports when the connection ended without a close frame.
    ABNORMAL = 1006
    # The WebSocket layer's "message too big" (above daphne's own frame limit).
    MESSAGE_TOO_BIG = 1009
    # Edge shutting down or draining, or a failure on the edge: reconnect and resume.
    RECONNECT = 4001
    # Token revoked or tenant deactivated while connected: stop, get a new token.
    POLICY = 4008
    FRAME_TOO_LARGE = 4009
    SLOW_CONSUMER = 4013
    RATE_LIMITED = 4029
    MALFORMED_FRAME = 4400
    TOKEN_EXPIRED = 4401
    # The peer's streams were reset (or what it missed is gone): reconnect and refetch.
    RESYNC = 4409


# A session that ends with these was asked to slow down: a client does not reset its backoff.
THROTTLE_CLOSES = frozenset({Close.SLOW_CONSUMER, Close.RATE_LIMITED})
# A session that ends with these must not reconnect with the same credential and frames.
FATAL_CLOSES = frozenset(
    {Close.POLICY, Close.TOKEN_EXPIRED, Close.MALFORMED_FRAME, Close.FRAME_TOO_LARGE, Close.MESSAGE_TOO_BIG}
)


class ResumeOutcome(enum.StrEnum):
    """Why a stream of a ``resume`` was not recovered (``resumed.streams.<name>.reason``)."""

    UNKNOWN_STREAM = "unknown_stream"
    EPOCH_CHANGED = "epoch_changed"
    OFFSET_AHEAD = "offset_ahead"
    RETENTION_EXCEEDED = "retention_exceeded"


class ErrorCode(enum.StrEnum):
    """``{"type": "error", "code": …}`` frames: the connection stays open."""

    UNKNOWN_TYPE = "unknown_type"
    RESUME_NOT_FIRST = "resume_not_first"
    INVALID_RESUME = "invalid_resume"


class FrameRejected(Exception):
    """Raised when an inbound frame must close the connection; ``code`` is the close code."""

    def __init__(self, code: Close) -> None:
        super().__init__(code.name)
        self.code = code


@dataclass(frozen=True, slots=True)
class Position:
    """Where a peer stands in one stream: its epoch and the last offset it processed."""

    epoch: str
    offset: int


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def too_large(text: str, max_bytes: int) -> bool:
    """Whether a text frame is over ``max_bytes`` of UTF-8 (close 4009)."""
    return len(text) > max_bytes or (not text.isascii() and len(text.encode()) > max_bytes)


def parse_frame(text: str | None) -> dict[str, Any]:
    """Return an inbound text frame as a JSON object with a string ``type``.

    Raises ``FrameRejected`` (4400) otherwise: binary (``None``), not JSON (``NaN`` and
    ``Infinity`` are not; nor is nesting deeper than the parser goes — 1 024 levels for orjson,
    the interpreter's recursion limit for ``json``; orjson also refuses integers past 64 bits
    and lone surrogates), not an object, or no string ``type``."""
    if text is None:
        raise FrameRejected(Close.MALFORMED_FRAME)
    try:
        frame = _loads(text)
    except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
        raise FrameRejected(Close.MALFORMED_FRAME) from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise FrameRejected(Close.MALFORMED_FRAME)
    return frame


def _json_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant)


# orjson refuses NaN and Infinity itself (they are not JSON).
_loads = orjson.loads if orjson is not None else _json_loads


def resume_positions(frame: Mapping[str, Any]) -> dict[str, Position] | None:
    """The positions a ``resume`` frame asks for, or None when it is malformed
    (``streams`` not an object of ``{"epoch": string, "offset": integer >= 0}``)."""
    wanted = frame.get("streams")
    if not isinstance(wanted, dict):
        return None
    out: dict[str, Position] = {}
    for name, pos in wanted.items():
        if not isinstance(pos, dict):
            return None
        epoch, offset = pos.get("epoch"), pos.get("offset")
        if not isinstance(epoch, str) or not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            return None
        out[name] = Position(epoch, offset)
    return out


def _json_compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _orjson_compact(obj: Any) -> str:
    # The server's frames hold no floats (orjson would write NaN as null where json refuses it).
    return orjson.dumps(obj).decode()


_compact = _orjson_compact if orjson is not None else _json_compact


def hello_frame(connection_id: str, edge_id: str, heads: Mapping[str, Position]) -> str:
    return _compact(
        {
            "type": "hello",
            "protocol": PROTOCOL,
            "connection_id": connection_id,
            "edge_id": edge_id,
            "streams": {name: {"epoch": p.epoch, "offset": p.offset} for name, p in heads.items()},
        }
    )


def resumed_frame(streams: Mapping[str, Mapping[str, Any]]) -> str:
    return _compact({"type": "resumed", "streams": streams})


def recovered(replayed: int) -> dict[str, Any]:
    return {"recovered": True, "replayed": replayed}


def not_recovered(reason: ResumeOutcome) -> dict[str, Any]:
    return {"recovered": False, "reason": reason.value}


def error_frame(code: ErrorCode) -> str:
    return _compact({"type": "error", "code": code.value})


PONG_FRAME = '{"type":"pong"}'
PING_FRAME = '{"type":"ping"}'


def event_frame(
    stream_name: str, epoch: str, offset: int, event_id: str, type: str, occurred_at: str, payload_json: str
) -> str:
    """Render an ``event`` frame; the payload JSON is spliced in as stored, not re-encoded
    (the relay renders each event once for every peer)."""
    return _event_frame(stream_name, epoch, offset, event_id, type, occurred_at, payload_json)


def _json_event_frame(
    stream_name: str, epoch: str, offset: int, event_id: str, type: str, occurred_at: str, payload_json: str
) -> str:
    return (
        '{"type":"event","stream":'
        + json.dumps(stream_name)
        + ',"epoch":'
        + json.dumps(epoch)
        + ',"offset":'
        + str(int(offset))
        + ',"event":{"event_id":'
        + json.dumps(event_id)
        + ',"type":'
        + json.dumps(type)
        + ',"occurred_at":'
        + json.dumps(occurred_at)
        + ',"payload":'
        + payload_json
        + "}}"
    )


def _orjson_event_frame(
    stream_name: str, epoch: str, offset: int, event_id: str, type: str, occurred_at: str, payload_json: str
) -> str:
    # The same bytes as _json_event_frame for the ASCII fields the backplane validates (a
    # non-ASCII one would be written as UTF-8 rather than \u-escaped: the same JSON).
    return orjson.dumps(
        {
            "type": "event",
            "stream": stream_name,
            "epoch": epoch,
            "offset": int(offset),
            "event": {
                "event_id": event_id,
                "type": type,
                "occurred_at": occurred_at,
                "payload": orjson.Fragment(payload_json),
            },
        }
    ).decode()


_event_frame = _orjson_event_frame if orjson is not None else _json_event_frame
