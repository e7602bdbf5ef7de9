"""The outbox: append, claim (assign offsets), forward-marking and range reads.

This is the only module that writes outbox rows. Contract:

- ``publish``/``publish_many`` insert inside the caller's transaction (durable append);
  a rolled-back transaction publishes nothing. The relay's doorbell rings on commit only.
- Publishing the same ``(tenant, event_id)`` twice is idempotent: the second is a no-op.
- ``assign_offsets`` gives *visible, committed* rows without an offset the next offsets
  of their streams, in one transaction. Rows are found by "has no offset", never by
  "id > cursor", so a transaction that commits after one with a higher id is not skipped.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from django.db import DatabaseError, OperationalError, connection, transaction
from django.utils import timezone

from backplane import doorbell, exceptions, redaction, streams
from backplane.conf import conf
from backplane.models import OutboxItem, Tenant

logger = logging.getLogger(__name__)

OUTBOX = OutboxItem._meta.db_table
STREAM = "backplane_stream"
EVENTKEY = "backplane_eventkey"
# An escaped NUL in JSON text: \u0000 after an even number of backslashes.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def resolve_tenant(tenant: Tenant | uuid.UUID | str) -> Tenant:
    """Return the active tenant given as object, id or slug."""
    if isinstance(tenant, Tenant):
        # Re-read: the caller's object may be stale (deleted or deactivated since loaded).
        obj = Tenant.objects.filter(pk=tenant.pk).first()
        if obj is None:
            raise exceptions.UnknownTenant(f"no tenant {tenant.pk}")
    else:
        try:
            key = tenant if isinstance(tenant, uuid.UUID) else uuid.UUID(str(tenant))
            obj = Tenant.objects.get(pk=key)
        except (ValueError, Tenant.DoesNotExist):
            try:
                obj = Tenant.objects.get(slug=str(tenant))
            except Tenant.DoesNotExist:
                raise exceptions.UnknownTenant(f"no tenant {tenant!r}") from None
    if not obj.is_active:
        raise exceptions.InactiveTenant(f"tenant {obj.slug!r} is not active")
    return obj


def _stream_for(tenant_id: uuid.UUID, device: str | None, role: str | None) -> str:
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


_FIELDS = frozenset({"type", "payload", "device", "role", "event_id", "occurred_at"})


def new_event_ids(n: int) -> list[str]:
    """``n`` time-ordered (version 7, RFC 9562) UUIDs as text: 48 bits of Unix milliseconds,
    then 74 random bits, from one read of the OS's random source.

    Time-ordered, so the idempotency keys (tenant, event id) of generated ids go in at the
    right edge of their B-tree instead of at random pages: fewer pages dirtied and split per
    publish. (``uuid.uuid4()`` also read the random source once per id: it was 40 % of a
    large publish_many's time.)"""
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


# One encoder, not one per call (json.dumps with options builds an encoder each time).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode(payload: Any) -> str:
    try:
        text = _JSON.encode(payload)
    except (TypeError, ValueError) as exc:
        raise exceptions.InvalidPayload(f"payload is not JSON: {exc}") from None
    if "\\u0000" in text and _NUL.search(text):  # PostgreSQL's jsonb cannot store NUL
        raise exceptions.InvalidPayload("payload holds a NUL character (\\u0000)")
    return text


def _build(
    tenant_id: uuid.UUID, spec: Mapping[str, Any], patterns: tuple[str, ...], new_id: str, now: datetime, cap: int
) -> tuple[Any, ...]:
    """Validate and redact one event; return (stream, event_id, type, occurred_at, payload_json, bytes).

    ``new_id``, ``now`` and ``cap``: the event id for an event without one, the default
    ``occurred_at`` and the payload cap, made or read once per call (``_built``)."""
    if not _FIELDS.issuperset(spec):
        raise exceptions.PublishError(f"unknown event fields: {sorted(set(spec) - _FIELDS)}")
    etype = spec.get("type")
    if not isinstance(etype, str) or not streams.EVENT_TYPE_RE.match(etype):
        raise exceptions.InvalidEventType(f"malformed event type {etype!r}")
    stream = _stream_for(tenant_id, spec.get("device"), spec.get("role"))
    event_id = spec.get("event_id")
    if event_id is None:
        event_id = new_id
    if not isinstance(event_id, str) or not streams.EVENT_ID_RE.match(event_id):
        raise exceptions.InvalidEventId(f"malformed event id {event_id!r}")
    occurred_at = spec.get("occurred_at") or now
    if not isinstance(occurred_at, datetime) or occurred_at.tzinfo is None:
        raise exceptions.PublishError("occurred_at must be an aware datetime")
    payload = spec.get("payload")
    text = _encode(payload)  # rejects non-JSON before redaction could hide it
    clean = redaction.redact(payload, patterns)
    if clean is not payload:
        text = _encode(clean)
    size = len(text) if text.isascii() else len(text.encode())
    if size > cap:
        raise exceptions.PayloadTooLarge(f"payload is {size} bytes; the cap is {cap}")
    return stream, event_id, etype, occurred_at, text, size


def _built(
    tenant_id: uuid.UUID, events: list[Mapping[str, Any]], patterns: tuple[str, ...]
) -> Iterator[tuple[Any, ...]]:
    """``_build`` for each event in turn, with the ids, the time and the cap made once."""
    ids, now, cap = new_event_ids(len(events)), timezone.now(), conf.MAX_PAYLOAD_BYTES
    for new_id, spec in zip(ids, events, strict=True):
        yield _build(tenant_id, spec, patterns, new_id, now, cap)


def _first_of_each(rows: Iterable[tuple[Any, ...]], seen: set[str]) -> list[tuple[Any, ...]]:
    """The rows whose event id is not in ``seen`` (which takes them): the same id twice in one
    call is one event."""
    out = []
    for row in rows:
        if row[1] not in seen:
            seen.add(row[1])
            out.append(row)
    return out


def publish(
    tenant: Tenant | uuid.UUID | str,
    type: str,
    payload: Any,
    *,
    device: str | None = None,
    role: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> str:
    """Append one event to the outbox inside the current transaction; return its event id.

    At-least-once: peers may see it more than once and dedupe by event id. Idempotent on
    ``(tenant, event_id)``. Raises a ``PublishError`` subclass and writes nothing on bad input.
    """
    spec = {
        "type": type,
        "payload": payload,
        "device": device,
        "role": role,
        "event_id": event_id,
        "occurred_at": occurred_at,
    }
    return publish_many(tenant, [spec])[0]


def publish_many(tenant: Tenant | uuid.UUID | str, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Append several events of one tenant in one statement; return their event ids.

    Each event is a mapping with ``type`` and ``payload`` and optionally ``device``,
    ``role``, ``event_id``, ``occurred_at``. All are validated before anything is written.
    """
    events = list(events)
    tenant_id = _known_id(tenant) if conf.is_postgresql else None
    if tenant_id is None:  # a slug (or SQLite): look the tenant up first
        tenant_id = resolve_tenant(tenant).id
    shard = streams.shard_of(tenant_id, conf.SHARDS)
    patterns = _patterns(tuple(conf.REDACT_PATTERNS))
    try:
        if conf.is_postgresql and len(events) > PIPELINE_SLICE:
            event_ids = _publish_pipelined(tenant_id, shard, events, patterns)
        else:
            rows = list(_built(tenant_id, events, patterns))  # all validated before anything is written
            if not rows:
                return []
            _insert(tenant_id, shard, _first_of_each(rows, set()))
            event_ids = [row[1] for row in rows]
    except exceptions.UnknownTenant:
        if isinstance(tenant, Tenant | uuid.UUID):
            raise
        return publish_many(resolve_tenant(tenant), events)  # a slug that looks like a UUID
    transaction.on_commit(lambda: doorbell.ring(shard))
    return event_ids


# A large publish_many on PostgreSQL goes out in slices of this many events, pipelined: the
# database inserts one slice while Python validates and encodes the next (two cores busy
# instead of one, then the other).
PIPELINE_SLICE = 500


def _publish_pipelined(
    tenant_id: uuid.UUID, shard: int, events: list[Mapping[str, Any]], patterns: tuple[str, ...]
) -> list[str]:
    """publish_many for more than a slice of events: one savepoint, the slices' statements
    pipelined. A bad event found after earlier slices went out rolls them back to the
    savepoint, so the caller's transaction stays usable and nothing is written — as when all
    are validated first."""
    prepare = conf.PREPARED_STATEMENTS
    built = _built(tenant_id, events, patterns)
    event_ids: list[str] = []
    seen: set[str] = set()
    sent: list[Any] = []
    with transaction.atomic(), _driver_errors():
        cur = _statement_cursor()
        with cur.connection.pipeline():
            for _ in range(0, len(events), PIPELINE_SLICE):
                rows = list(itertools.islice(built, PIPELINE_SLICE))
                event_ids += [row[1] for row in rows]
                rows = _first_of_each(rows, seen)
                if rows:
                    cur = psycopg.Cursor(cur.connection)
                    cur.execute(_PUBLISH_MANY_SQL, _many_params(tenant_id, shard, rows), binary=True, prepare=prepare)
                    sent.append(cur)
        for cur in sent:
            _tenant_state_ok(cur.fetchone()[0], tenant_id)
            cur.close()
    return event_ids


@functools.lru_cache(maxsize=8)
def _patterns(configured: tuple[str, ...]) -> tuple[str, ...]:
    return redaction.normalise_patterns(configured)


def _known_id(tenant: Tenant | uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(tenant, Tenant):
        return tenant.id
    if isinstance(tenant, uuid.UUID):
        return tenant
    try:
        return uuid.UUID(str(tenant))
    except ValueError:
        return None


# Rows per INSERT statement (PostgreSQL arrays; SQLite bound-parameter limits).
INSERT_CHUNK = 5000


def _insert(tenant_id: uuid.UUID, shard: int, rows: list[tuple[Any, ...]]) -> None:
    """Insert event keys and, for the keys that are new, outbox rows. Raises UnknownTenant or
    InactiveTenant (and writes nothing) unless the tenant exists and is active.

    On PostgreSQL one statement per chunk checks the tenant, inserts the keys with ON CONFLICT
    DO NOTHING, and inserts into the outbox only the rows whose keys went in. No savepoint:
    a single statement is atomic, and on SQLite the caller's transaction (or ours) is.
    """
    with transaction.atomic(savepoint=False):
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[start : start + INSERT_CHUNK]
            if conf.is_postgresql:
                raw = _statement_cursor()
                if len(chunk) == 1:  # publish(): scalar parameters, a plan without JSON unpacking
                    st, eid, et, at, text, size = chunk[0]
                    params: list[Any] = [tenant_id, tenant_id, eid, tenant_id, st, et, at, text, size, shard]
                    _execute_raw(raw, _PUBLISH_ONE_SQL, params, binary=True, prepare=conf.PREPARED_STATEMENTS)
                else:
                    params = _many_params(tenant_id, shard, chunk)
                    _execute_raw(raw, _PUBLISH_MANY_SQL, params, binary=True, prepare=conf.PREPARED_STATEMENTS)
                # Raised inside the atomic block: earlier chunks roll back with it.
                _tenant_state_ok(raw.fetchone()[0], tenant_id)
                raw.close()
                continue
            fresh: set[str] = set()
            with connection.cursor() as cur:
                for part in range(0, len(chunk), 300):
                    ids = [r[1] for r in chunk[part : part + 300]]
                    cur.execute(
                        f"INSERT INTO {EVENTKEY} (tenant_id, event_id, created_at) VALUES "
                        + ",".join(["(%s,%s,CURRENT_TIMESTAMP)"] * len(ids))
                        + " ON CONFLICT DO NOTHING RETURNING event_id",
                        [x for eid in ids for x in (tenant_id.hex, eid)],
                    )
                    fresh.update(e for (e,) in cur.fetchall())
            OutboxItem.objects.bulk_create(
                [
                    OutboxItem(
                        tenant_id=tenant_id,
                        kind="event",
                        stream=st,
                        event_id=eid,
                        type=et,
                        occurred_at=at,
                        payload=json.loads(text),
                        payload_bytes=size,
                        shard=shard,
                    )
                    for st, eid, et, at, text, size in chunk
                    if eid in fresh
                ],
                batch_size=500,
            )


# Both check the tenant (unknown: NULL; inactive: false) and insert the event keys with ON
# CONFLICT DO NOTHING, then the outbox rows whose keys went in; one statement is atomic.
_PUBLISH_ONE_SQL = (
    f"WITH t AS (SELECT is_active FROM backplane_tenant WHERE id = %s), "
    f"k AS (INSERT INTO {EVENTKEY} (tenant_id, event_id) SELECT %s, %s "
    f"WHERE coalesce((SELECT is_active FROM t), false) ON CONFLICT DO NOTHING RETURNING event_id), "
    f"o AS (INSERT INTO {OUTBOX} (tenant_id, kind, stream, event_id, type, occurred_at, payload, "
    f"payload_bytes, shard) SELECT %s, 'event', %s, k.event_id, %s, %s, %s::jsonb, %s, %s FROM k RETURNING 1) "
    f"SELECT (SELECT is_active FROM t), (SELECT count(*) FROM o)"
)
# publish_many's rows come as two JSON texts parsed once each as jsonb (json's ->> would
# re-read a row's text for every field).
_PUBLISH_MANY_SQL = (
    f"WITH t AS (SELECT is_active FROM backplane_tenant WHERE id = %s), "
    f"v AS (SELECT a.i, a.m->>0 AS stream, a.m->>1 AS event_id, a.m->>2 AS type, "
    f"(a.m->>3)::timestamptz AS occurred_at, (a.m->>4)::int AS payload_bytes, b.p AS payload "
    f"FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS a(m, i) "
    f"JOIN jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS b(p, i) USING (i)), "
    f"k AS (INSERT INTO {EVENTKEY} (tenant_id, event_id) SELECT %s, v.event_id FROM v "
    f"WHERE coalesce((SELECT is_active FROM t), false) ON CONFLICT DO NOTHING RETURNING event_id), "
    f"o AS (INSERT INTO {OUTBOX} (tenant_id, kind, stream, event_id, type, occurred_at, payload, "
    f"payload_bytes, shard) SELECT %s, 'event', v.stream, v.event_id, v.type, v.occurred_at, "
    f"v.payload, v.payload_bytes, %s FROM v JOIN k USING (event_id) ORDER BY v.i RETURNING 1) "
    f"SELECT (SELECT is_active FROM t), (SELECT count(*) FROM o)"
)

# psycopg prepares a statement executed with prepare=True only if its connection has a
# threshold; Django sets none (no automatic preparation). One no count reaches lets just the
# statements asked for be prepared: Django's own cursors bind client-side and never prepare.
_PREPARE_ONLY_WHEN_ASKED = 2**31


def _statement_cursor() -> psycopg.Cursor[Any]:
    """A server-side-binding psycopg cursor on Django's connection (in its transaction)."""
    connection.ensure_connection()
    conn = connection.connection
    if conf.PREPARED_STATEMENTS and conn.prepare_threshold is None:
        conn.prepare_threshold = _PREPARE_ONLY_WHEN_ASKED
    return psycopg.Cursor(conn)


def _tenant_state_ok(state: bool | None, tenant_id: uuid.UUID) -> None:
    """Raise unless a publish statement found the tenant (NULL: unknown) and active."""
    if state is None:
        raise exceptions.UnknownTenant(f"no tenant {tenant_id}")
    if state is False:
        raise exceptions.InactiveTenant(f"tenant {tenant_id} is not active")


def _many_params(tenant_id: uuid.UUID, shard: int, chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    """_PUBLISH_MANY_SQL's parameters: two JSON texts instead of six arrays — the rows' fields
    (encoded by the json module in C) and the payloads, already JSON, joined as they are.
    psycopg's array dumpers work element by element in Python (43 % of publish_many)."""
    meta = json.dumps(_fields(chunk), separators=(",", ":"))
    payloads = "[" + ",".join(r[4] for r in chunk) + "]"
    return [tenant_id, meta, payloads, tenant_id, tenant_id, shard]


def _fields(chunk: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """The rows' fields but the payload, times as ISO text (the events of one publish_many
    call mostly share one default time: formatted once)."""
    out: list[list[Any]] = []
    last_at, last_iso = None, ""
    for stream, event_id, etype, at, _text, size in chunk:
        if at is not last_at:
            last_at, last_iso = at, at.isoformat()
        out.append([stream, event_id, etype, last_iso, size])
    return out


def _execute_raw(
    cur: Any, sql: str, params: Sequence[Any], *, binary: bool = False, prepare: bool | None = None
) -> None:
    """Run a statement on a raw psycopg cursor, with ``_driver_errors``."""
    with _driver_errors():
        cur.execute(sql, params, binary=binary, prepare=prepare)


@contextlib.contextmanager
def _driver_errors() -> Iterator[None]:
    """Turn driver errors into backplane errors without their DETAIL/CONTEXT lines
    (PostgreSQL quotes parameter values there). Django's wrapper first: it marks the
    connection (``errors_occurred``), so a broken one is replaced, not reused."""
    try:
        with connection.wrap_database_errors:
            yield
    except OperationalError as exc:
        raise exceptions.StoreUnavailable(type(exc).__name__) from None
    except DatabaseError as exc:
        raise exceptions.PublishError(f"the database refused the events ({type(exc).__name__})") from None


def publish_command(tenant_id: uuid.UUID, edge_id: str, command: str, args: Mapping[str, Any]) -> str:
    """Append a directed command for one edge (carried like an event, to ``bp.edge.<id>``)."""
    shard = streams.shard_of(tenant_id, conf.SHARDS)
    body = {"command": command, "tenant_id": str(tenant_id), **args}
    text = _encode(body)
    event_id = f"cmd-{uuid.uuid4().hex}"
    OutboxItem.objects.create(
        tenant_id=tenant_id,
        kind="command",
        stream=streams.edge_stream(edge_id),
        event_id=event_id,
        type=f"bp.{command}",
        occurred_at=timezone.now(),
        payload=body,
        payload_bytes=len(text),
        shard=shard,
    )
    transaction.on_commit(lambda: doorbell.ring(shard))
    return event_id


# --- relay side -----------------------------------------------------------------------


def _in(values: Sequence[Any]) -> str:
    return ",".join(["%s"] * len(values))


def _part(alias: str = "") -> str:
    """SQL for the partition holding a row, usable as a table name (PostgreSQL), or NULL."""
    return f"{alias}tableoid::regclass::text" if conf.is_postgresql else "NULL"


def _by_part(pairs: Iterable[tuple[int, int]], part_of: Mapping[int, Any]) -> dict[str, list[tuple[int, int]]]:
    grouped: dict[str, list[tuple[int, int]]] = {}
    for pair in pairs:
        grouped.setdefault(part_of[pair[0]], []).append(pair)
    return grouped


def _tid(tenant_id: Any) -> Any:
    """A tenant id as the database driver wants it (SQLite stores UUIDs as hex)."""
    value = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(str(tenant_id))
    return value if conf.is_postgresql else value.hex


def _tenant_filter(only: Any, skip: Sequence[Any], column: str = "tenant_id") -> tuple[str, list[Any]]:
    if only is not None:
        return f" AND {column} = %s", [_tid(only)]
    if skip:
        return f" AND {column} NOT IN ({_in(skip)})", [_tid(t) for t in skip]
    return "", []


def pending_tenants(shards: Sequence[int]) -> list[Any]:
    """Tenants with unassigned or unforwarded rows in ``shards`` (for per-tenant fallback)."""
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT DISTINCT tenant_id FROM {OUTBOX} WHERE shard IN ({_in(shards)}) AND forwarded_at IS NULL",
            list(shards),
        )
        return [t for (t,) in cur.fetchall()]


def assign_offsets(
    shards: Sequence[int], limit: int, *, only_tenant: Any = None, skip_tenants: Sequence[Any] = ()
) -> int:
    """Give committed rows without an offset their streams' next offsets; return the count.

    One transaction: claim the oldest unassigned rows of ``shards``, bump each stream's
    ``last_offset`` by its row count (creating the stream with a fresh epoch if new), and
    write the offsets in id order within each stream. ``only_tenant``/``skip_tenants`` let
    the relay isolate a tenant whose rows make the transaction fail.
    """
    return len(assign_and_fetch(shards, limit, only_tenant=only_tenant, skip_tenants=skip_tenants))


def assign_and_fetch(
    shards: Sequence[int], limit: int, *, only_tenant: Any = None, skip_tenants: Sequence[Any] = ()
) -> list[Pending]:
    """``assign_offsets``, returning the newly assigned rows ready to send (one round of I/O less)."""
    if not shards:
        return []
    pg = conf.is_postgresql
    extra, extra_params = _tenant_filter(only_tenant, skip_tenants)
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            f"SELECT id, stream, tenant_id, {_part()} FROM {OUTBOX} WHERE shard IN ({_in(shards)}) "
            f"AND stream_offset IS NULL{extra} ORDER BY id LIMIT %s" + (" FOR UPDATE" if pg else ""),
            [*shards, *extra_params, limit],
        )
        rows = cur.fetchall()
        if not rows:
            return []
        per_stream: dict[str, list[int]] = {}
        tenant_of: dict[str, Any] = {}
        part_of: dict[int, str] = {}
        for row_id, stream, tenant_id, part in rows:
            per_stream.setdefault(stream, []).append(row_id)
            tenant_of[stream] = tenant_id
            part_of[row_id] = part
        keys = sorted(per_stream)  # a fixed lock order
        values = ",".join(["(%s,%s,%s,%s,%s,1,CURRENT_TIMESTAMP)"] * len(keys))
        params: list[Any] = []
        for key in keys:
            params += [key, _tid(tenant_of[key]), streams.audience_of(key), streams.new_epoch(), len(per_stream[key])]
        cur.execute(
            f"INSERT INTO {STREAM} (key, tenant_id, audience, epoch, last_offset, "
            f"first_retained_offset, updated_at) VALUES {values} ON CONFLICT (key) DO UPDATE SET "
            f"last_offset = {STREAM}.last_offset + excluded.last_offset, updated_at = excluded.updated_at "
            f"RETURNING key, last_offset, epoch",
            params,
        )
        heads = {key: (last, epoch) for key, last, epoch in cur.fetchall()}
        ids: list[int] = []
        offsets: list[int] = []
        for key, row_ids in per_stream.items():
            first = heads[key][0] - len(row_ids) + 1
            ids += row_ids
            offsets += range(first, first + len(row_ids))
        now = timezone.now()
        cols = (
            "o.id, o.kind, o.stream, o.shard, o.stream_offset, o.event_id, o.type, o.occurred_at, o.payload, "
            "o.tenant_id"
        )
        if pg:
            # Update each partition directly: through the parent, planning alone would cost
            # more than the work (every partition is planned).
            out = []
            for part, pairs in _by_part(zip(ids, offsets, strict=True), part_of).items():
                cur.execute(
                    f"UPDATE {part} o SET stream_offset = v.off, assigned_at = %s "
                    f"FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, off) WHERE o.id = v.id "
                    f"RETURNING {cols}, {_part('o.')}",
                    [now, [i for i, _ in pairs], [o for _, o in pairs]],
                )
                out += cur.fetchall()
        else:
            cur.executemany(
                f"UPDATE {OUTBOX} SET stream_offset = %s, assigned_at = %s WHERE id = %s",
                [(off, now, i) for i, off in zip(ids, offsets, strict=True)],
            )
            out = []
            for part in range(0, len(ids), 500):
                chunk = ids[part : part + 500]
                cur.execute(f"SELECT {cols}, NULL FROM {OUTBOX} o WHERE o.id IN ({_in(chunk)})", chunk)
                out += cur.fetchall()
        pending = [
            Pending(
                r[0], r[1], r[2], heads[r[2]][1], r[3], streams.Item(r[4], r[5], r[6], _iso(r[7]), r[8]), r[9], r[10]
            )
            for r in out
        ]
        pending.sort(key=lambda p: (p.stream, p.item.offset))
        return pending


@dataclass(frozen=True)
class Pending:
    """An assigned row that no relay has recorded as forwarded yet."""

    id: int
    kind: str
    stream: str
    epoch: str
    shard: int
    item: streams.Item
    tenant_id: Any = None
    part: str | None = None  # PostgreSQL: the partition holding the row


def _iso(value: Any) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def fetch_unforwarded(shards: Sequence[int], limit: int, *, skip_tenants: Sequence[Any] = ()) -> list[Pending]:
    """Return assigned, unforwarded rows of ``shards`` ordered by stream and offset.

    After a relay crash these are exactly the rows to send again, with the same offsets.
    """
    if not shards:
        return []
    extra, extra_params = _tenant_filter(None, skip_tenants, "o.tenant_id")
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT o.id, o.kind, o.stream, s.epoch, o.shard, o.stream_offset, o.event_id, o.type, "
            f"o.occurred_at, o.payload, o.tenant_id, {_part('o.')} "
            f"FROM {OUTBOX} o JOIN {STREAM} s ON s.key = o.stream "
            f"WHERE o.shard IN ({_in(shards)}) AND o.forwarded_at IS NULL "
            f"AND o.stream_offset IS NOT NULL{extra} ORDER BY o.stream, o.stream_offset LIMIT %s",
            [*shards, *extra_params, limit],
        )
        return [
            Pending(r[0], r[1], r[2], r[3], r[4], streams.Item(r[5], r[6], r[7], _iso(r[8]), r[9]), r[10], r[11])
            for r in cur.fetchall()
        ]


def mark_forwarded(ids: Sequence[int], parts: Sequence[str | None] | None = None) -> None:
    """Record rows as forwarded (they become eligible for compaction).

    ``parts`` (the partition of each row, from ``Pending.part``) lets PostgreSQL update each
    partition directly.
    """
    if not ids:
        return
    now = timezone.now()
    with connection.cursor() as cur:
        if conf.is_postgresql:
            if parts is None or None in parts:
                cur.execute(f"UPDATE {OUTBOX} SET forwarded_at = %s WHERE id = ANY(%s)", [now, list(ids)])
                return
            for part, pairs in _by_part(zip(ids, ids, strict=True), dict(zip(ids, parts, strict=True))).items():
                cur.execute(f"UPDATE {part} SET forwarded_at = %s WHERE id = ANY(%s)", [now, [i for i, _ in pairs]])
        else:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                cur.execute(f"UPDATE {OUTBOX} SET forwarded_at = %s WHERE id IN ({_in(chunk)})", [now, *chunk])


# --- edge side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    epoch: str
    offset: int
    first_retained: int


def ensure_streams(tenant_id: uuid.UUID, keys: Sequence[str]) -> dict[str, Head]:
    """Return the heads of ``keys``, creating never-seen streams at offset 0 with an epoch."""
    pg = conf.is_postgresql
    tid: Any = tenant_id if pg else tenant_id.hex
    with connection.cursor() as cur:
        values = ",".join(["(%s,%s,%s,%s,0,1,CURRENT_TIMESTAMP)"] * len(keys))
        params: list[Any] = []
        for key in keys:
            params += [key, tid, streams.audience_of(key), streams.new_epoch()]
        cur.execute(
            f"INSERT INTO {STREAM} (key, tenant_id, audience, epoch, last_offset, first_retained_offset, "
            f"updated_at) VALUES {values} ON CONFLICT (key) DO NOTHING",
            params,
        )
    return stream_heads(keys)


def stream_heads(keys: Sequence[str]) -> dict[str, Head]:
    """Return the current heads of the given streams (missing streams are left out)."""
    if not keys:
        return {}
    if conf.is_postgresql:
        # The keys as one JSON text: an edge asks for all its streams' heads twice a second,
        # and rendering a thousand placeholders client-side was most of an idle edge's CPU.
        cur = _statement_cursor()
        try:
            with connection.wrap_database_errors:
                cur.execute(
                    f"SELECT key, epoch, last_offset, first_retained_offset FROM {STREAM} "
                    f"WHERE key IN (SELECT jsonb_array_elements_text(%s::jsonb))",
                    [json.dumps(list(keys))],
                    prepare=conf.PREPARED_STATEMENTS,
                )
                return {k: Head(e, o, f) for k, e, o, f in cur.fetchall()}
        finally:
            cur.close()
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT key, epoch, last_offset, first_retained_offset FROM {STREAM} WHERE key IN ({_in(keys)})",
            list(keys),
        )
        return {k: Head(e, o, f) for k, e, o, f in cur.fetchall()}


def read_range(stream_key: str, after: int, upto: int) -> list[streams.Item]:
    """Return the stream's stored items with ``after < offset <= upto``, in offset order."""
    if upto <= after:
        return []
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT stream_offset, event_id, type, occurred_at, payload FROM {OUTBOX} "
            f"WHERE stream = %s AND stream_offset > %s AND stream_offset <= %s ORDER BY stream_offset",
            [stream_key, after, upto],
        )
        return [streams.Item(o, e, t, _iso(at), p) for o, e, t, at, p in cur.fetchall()]


# --- relay side, PostgreSQL fast path -------------------------------------------------
#
# The relay runs these on its lease session (a psycopg AsyncConnection in autocommit mode):
# no thread hop, server-side binding (prepared after a few runs), and a statement that
# succeeds proves the session holding the shard locks is alive.

_ASSIGN_SQL = "SELECT * FROM bp_assign(%s::int[], %s::int, %s::uuid, %s::uuid[])"


async def aassign_and_fetch(
    conn: Any,
    shards: Sequence[int],
    limit: int,
    *,
    only_tenant: Any = None,
    skip_tenants: Sequence[Any] = (),
    forwarded: Sequence[Pending] = (),
) -> list[Pending]:
    """``assign_and_fetch`` on the relay's own PostgreSQL session, in one round trip.

    ``bp_assign`` (migrations 0008, 0009) claims the rows, bumps the streams' heads, numbers
    the rows and writes their offsets by primary key, returning them to be sent.
    BEGIN, the call and COMMIT go out pipelined and come back with one sync. (Not psycopg's
    ``transaction()``: inside a pipeline it syncs on entering and leaving, four round trips.)
    ``forwarded``: rows sent since the last assignment, marked forwarded in the same
    transaction (no round trip of their own; if it fails they stay unmarked). After the call:
    the outbox's parent table is locked before any partition, as everywhere (``partitions``)."""
    params = [list(shards), limit, only_tenant, list(skip_tenants)]
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await conn.execute("SET LOCAL synchronous_commit = on")  # see leases.SESSION_SETTINGS
            cur = await conn.execute(_ASSIGN_SQL, params)
            for part, ids in _ids_by_part(forwarded).items():
                await conn.execute(_MARK_SQL.format(part=part), [ids])
            await conn.execute("COMMIT")
    except BaseException:
        # A failed call leaves the transaction aborted (the COMMIT was skipped): end it, so the
        # session is usable again. A session that cannot even roll back is closed: the caller
        # sees it closed and drops its shards.
        if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                await conn.close()
        raise
    out = [
        Pending(r[0], r[3], r[4], r[2], r[5], streams.Item(r[6], r[7], r[8], _iso(r[9]), r[10]), r[11], r[1])
        for r in await cur.fetchall()
    ]
    out.sort(key=lambda p: (p.stream, p.item.offset))
    return out


_MARK_SQL = "UPDATE {part} SET forwarded_at = now() WHERE id = ANY(%s)"


def _ids_by_part(pending: Sequence[Pending]) -> dict[str, list[int]]:
    """Row ids by partition, each once (a row re-sent by a sweep may be listed twice)."""
    by_part: dict[str, dict[int, None]] = {}
    for p in pending:
        by_part.setdefault(p.part or OUTBOX, {})[p.id] = None
    return {part: list(ids) for part, ids in by_part.items()}


async def amark_forwarded(conn: Any, pending: Sequence[Pending]) -> None:
    """``mark_forwarded`` on the relay's own session, one statement per partition (for rows
    no assignment has carried the marks of: see ``aassign_and_fetch``'s ``forwarded``)."""
    by_part = _ids_by_part(pending)
    # A statement per partition (almost always one), each its own transaction: by primary key
    # only and without waiting for the WAL flush (leases.SESSION_SETTINGS). A pipelined
    # transaction with its own settings took twice as long.
    if len(by_part) == 1:
        ((part, ids),) = by_part.items()
        await conn.execute(_MARK_SQL.format(part=part), [ids])
        return
    async with conn.pipeline():
        for part, ids in by_part.items():
            await conn.execute(_MARK_SQL.format(part=part), [ids])
