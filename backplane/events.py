"""Producer-side event logic, pure: validation, event ids, JSON encoding, audience → stream.

No ORM and no settings here: the caller passes the redaction patterns, the payload cap and
the default time in (``backplane.outbox`` reads them from ``conf``). A built event is an
``EventRow`` tuple ``(stream, event_id, type, occurred_at, payload_json, payload_bytes)``;
everything about it is checked before anything is written, and a bad one raises a named
``PublishError`` subclass.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from backplane import exceptions, redaction, secrets, streams

EventRow = tuple[str, str, str, datetime, str, int]

FIELDS = frozenset({"type", "payload", "device", "role", "event_id", "occurred_at"})
# An escaped NUL in JSON text: \u0000 after an even number of backslashes.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# One encoder, not one per call (json.dumps with options builds an encoder each time). Its
# default hook runs only for what JSON cannot encode: a SecretRef becomes its JSON form.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=secrets.json_default)


def new_event_ids(n: int) -> list[str]:
    """``n`` time-ordered (version 7, RFC 9562) UUIDs as text: 48 bits of Unix milliseconds,
    then 74 random bits, from one read of the OS's random source (one id: from a pool that
    one read fills for 256, ``_random16``).

    Time-ordered, so the idempotency keys (tenant, event id) of generated ids go in at the
    right edge of their B-tree instead of at random pages: fewer pages dirtied and split per
    publish; made in bulk from one read of the random source
    (docs/decisions/0007-uuidv7-event-ids.md)."""
    if n == 1:  # publish(): one id without the slicing made for many (5 µs → under 2)
        b = bytearray(_random16())
        b[0:6] = (time.time_ns() // 1_000_000).to_bytes(6, "big")
        b[6] = b[6] & 0x0F | 0x70
        b[8] = b[8] & 0x3F | 0x80
        h = b.hex()
        return [f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"]
    raw = bytearray(os.urandom(16 * n))
    for i, byte in enumerate((time.time_ns() // 1_000_000).to_bytes(6, "big")):
        raw[i::16] = bytes((byte,)) * n
    raw[6::16] = bytes(b & 0x0F | 0x70 for b in raw[6::16])  # version 7
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 9562 variant
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


# Random bytes for publish()'s event ids, read from the OS 4 KiB at a time: one getrandom
# system call per 256 events rather than one per publish()
# (docs/decisions/0049-doorbell-reads-replies-between-bursts.md). Each 16 bytes is handed
# out once (list.pop is atomic); a forked child drops what its parent had read, or both
# would make the same ids.
_POOL_BYTES = 4096
_pool: list[bytes] = []


def _random16() -> bytes:
    try:
        return _pool.pop()
    except IndexError:
        # This call keeps the read's first 16 bytes: other threads may empty the pool between
        # the extend and a pop of ours.
        raw = os.urandom(_POOL_BYTES)
        _pool.extend(raw[i : i + 16] for i in range(16, _POOL_BYTES, 16))
        return raw[:16]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.clear)


def encode(payload: Any) -> str:
    """Compact JSON text of ``payload``; raise ``InvalidPayload`` for anything that is not JSON
    (NaN and Infinity included) or that holds a NUL character (PostgreSQL's jsonb cannot)."""
    try:
        text = _JSON.encode(payload)
    except (TypeError, ValueError) as exc:
        raise exceptions.InvalidPayload(f"payload is not JSON: {exc}") from None
    if "\\u0000" in text and _NUL.search(text):
        raise exceptions.InvalidPayload("payload holds a NUL character (\\u0000)")
    return text


def stream_for(tenant_id: uuid.UUID, device: str | None, role: str | None) -> str:
    """The stream of an event's audience: one device, one role, or (neither) the whole tenant."""
    if device is not None and role is not None:
        raise exceptions.InvalidAudience("give a device or a role, not both")
    if device is not None:
        if not isinstance(device, str) or not streams.DEVICE_ID_RE.match(device):
            raise exceptions.InvalidAudience(f"malformed device id {device!r}")
        return streams.device_stream(tenant_id, device)
    if role is not None:
        if role not in streams.ROLES:
            raise exceptions.InvalidAudience(f"role must be one of {', '.join(streams.ROLES)}")
        return streams.role_stream(tenant_id, role)
    return streams.tenant_stream(tenant_id)


def build(
    tenant_id: uuid.UUID, spec: Mapping[str, Any], patterns: tuple[str, ...], new_id: str, now: datetime, cap: int
) -> EventRow:
    """Validate and redact one event (a mapping of ``FIELDS``) into its row.

    ``new_id``: the event id if the spec has none; ``now``: the default ``occurred_at``;
    ``cap``: the largest payload in bytes of compact JSON, measured after redaction.
    ``patterns``: the compiled redaction rules (``redaction.normalise_patterns``); values that
    are credentials are redacted whatever their key, secret handles never."""
    if not FIELDS.issuperset(spec):
        raise exceptions.PublishError(f"unknown event fields: {sorted(set(spec) - FIELDS)}")
    event_id = spec.get("event_id")
    return build_one(
        tenant_id,
        spec.get("type"),
        spec.get("payload"),
        spec.get("device"),
        spec.get("role"),
        new_id if event_id is None else event_id,
        spec.get("occurred_at") or now,
        patterns,
        cap,
    )


def build_one(
    tenant_id: uuid.UUID,
    etype: Any,
    payload: Any,
    device: Any,
    role: Any,
    event_id: Any,
    occurred_at: Any,
    patterns: tuple[str, ...],
    cap: int,
) -> EventRow:
    """``build`` of one event given as its fields (``event_id`` and ``occurred_at`` already
    defaulted): ``publish()`` calls it directly, without a mapping per event."""
    if not isinstance(etype, str) or not streams.EVENT_TYPE_RE.match(etype):
        raise exceptions.InvalidEventType(f"malformed event type {etype!r}")
    stream = stream_for(tenant_id, device, role)
    if not isinstance(event_id, str) or not streams.EVENT_ID_RE.match(event_id):
        raise exceptions.InvalidEventId(f"malformed event id {event_id!r}")
    if not isinstance(occurred_at, datetime) or occurred_at.tzinfo is None:
        raise exceptions.PublishError("occurred_at must be an aware datetime")
    text = encode(payload)  # rejects non-JSON before redaction could hide it
    clean = redaction.redact(payload, patterns)
    if clean is not payload:
        text = encode(clean)
    size = len(text) if text.isascii() else len(text.encode())
    if size > cap:
        raise exceptions.PayloadTooLarge(f"payload is {size} bytes; the cap is {cap}")
    return stream, event_id, etype, occurred_at, text, size


def build_all(
    tenant_id: uuid.UUID, specs: Sequence[Mapping[str, Any]], patterns: tuple[str, ...], now: datetime, cap: int
) -> Iterator[EventRow]:
    """``build`` for each event in turn, lazily, with the ids for events without one made at once."""
    for new_id, spec in zip(new_event_ids(len(specs)), specs, strict=True):
        yield build(tenant_id, spec, patterns, new_id, now, cap)


def first_of_each(rows: Iterable[EventRow], seen: set[str]) -> list[EventRow]:
    """The rows whose event id is not in ``seen`` (which takes them): the same id twice in one
    call is one event."""
    out = []
    for row in rows:
        if row[1] not in seen:
            seen.add(row[1])
            out.append(row)
    return out


def command_event_id() -> str:
    """A directed command's event id (``cmd-`` and 32 random hex digits)."""
    return f"cmd-{uuid.uuid4().hex}"
