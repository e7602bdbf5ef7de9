"""The PostgreSQL store: the cluster's backend (statements in ``sql/postgresql.sql``).

Offsets are assigned only by ``bp_assign_v3`` (``sql/bp_assign_v3.sql``), a PL/pgSQL function:
the relay calls it on its own lease session in one round trip; ``assign`` calls it on Django's
connection. The outbox is partitioned by ``created_at`` (``backplane.partitions``); a row's
partition (``Pending.part``) lets marks go to it directly by primary key.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, connection, connections, transaction
from django.db.models.signals import post_delete, post_save

from backplane import doorbell, exceptions, hoptrace, partitions, streams
from backplane.claims import ClaimFloor
from backplane.conf import conf
from backplane.events import EventRow, first_of_each
from backplane.store import common, queries, rows
from backplane.store.base import OUTBOX
from backplane.store.rows import Head, Item, Pending

logger = logging.getLogger(__name__)

SQL = queries.load("postgresql.sql")

LOCK_CLASS = 0x7479  # "ty": the first key of the two-key advisory lock space (relays' shards)
COMPACTOR_LOCK = -1  # its second key for the one compactor
# The relay's own session (its leases, assignment and marks) finds outbox rows by primary key
# or partial index only: on a partition not analyzed yet (a fresh one) the planner would
# otherwise scan it whole for each statement. Its commits do not wait for the WAL flush — a
# lost mark only means rows go again — except the assignment's: bp_assign_v3 sets it on for its
# own transaction (offsets must be durable before they are sent).
SESSION_SETTINGS = ("SET enable_seqscan = off", "SET synchronous_commit = off")
# A large publish_many goes out in slices of this many events, pipelined: the database inserts
# one slice while Python validates and encodes the next (two cores busy instead of one, then
# the other).
PIPELINE_SLICE = 500
# Rows per INSERT statement.
INSERT_CHUNK = 5000
# psycopg prepares a statement executed with prepare=True only if its connection has a
# threshold; Django sets none (no automatic preparation). One no count reaches lets just the
# statements asked for be prepared: Django's own cursors bind client-side and never prepare.
_PREPARE_ONLY_WHEN_ASKED = 2**31


class PostgreSQLStore:
    """``backplane.store.base.Store`` on PostgreSQL."""

    vendor = "postgresql"
    single_thread = False
    statements_done_at = 0.0  # bench/hop_trace.py: the last assignment's statements' end

    # --- producer side -----------------------------------------------------------------------

    def append(self, tenant_id: uuid.UUID, shard: int, rows: Iterable[EventRow], count: int) -> list[str]:
        if count > PIPELINE_SLICE:
            return _append_pipelined(tenant_id, shard, rows, count)
        built = list(rows)  # all validated before anything is written
        db = connections[DEFAULT_DB_ALIAS]
        if len(built) == 1 and _at_commit_ok(db, tenant_id):
            _append_at_commit(db, shard, tenant_id, built[0])
        elif built:
            _insert(tenant_id, shard, first_of_each(built, set()))
        return [row[1] for row in built]

    def append_one(self, tenant_id: uuid.UUID, shard: int, row: EventRow) -> bool:
        db = connections[DEFAULT_DB_ALIAS]
        if _at_commit_ok(db, tenant_id):
            _append_at_commit(db, shard, tenant_id, row, ring=True)
            return True
        _insert(tenant_id, shard, [row])
        return False

    def append_command(
        self, tenant_id: uuid.UUID, shard: int, stream: str, event_id: str, command: str, body: Mapping[str, Any]
    ) -> None:
        # The transaction's id before the row's: the relay's claim floor relies on it
        # (backplane.claims). The publish statements get it from the event key's insert.
        with transaction.atomic(savepoint=False), connection.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id()")
            common.append_command(tenant_id, shard, stream, event_id, command, body)

    # --- relay side --------------------------------------------------------------------------

    async def aopen_session(self) -> psycopg.AsyncConnection[Any]:
        session = await psycopg.AsyncConnection.connect(autocommit=True, **_conninfo())
        for setting in SESSION_SETTINGS:
            await session.execute(setting)
        return session

    async def aclose_session(self, session: Any) -> None:
        await session.close()

    def is_dead(self, session: Any) -> bool:
        return session is None or bool(session.broken or session.closed)

    async def aping(self, session: Any) -> None:
        await session.execute("SELECT 1")

    async def atake_shards(self, session: Any, shards: Sequence[int]) -> list[int]:
        cur = await session.execute(SQL["take_shards"], [LOCK_CLASS, list(shards)])
        return [shard for shard, ok in await cur.fetchall() if ok]

    async def aassign(
        self,
        session: Any,
        shards: Sequence[int],
        limit: int,
        *,
        only_tenant: Any = None,
        skip_tenants: Sequence[Any] = (),
        forwarded: Sequence[Pending] = (),
        floor: ClaimFloor | None = None,
    ) -> list[Pending]:
        """One round trip: the call of ``bp_assign_v4`` and the marks of ``forwarded`` go out as
        one simple query, their parameters written into its text (``_statement``). In autocommit
        the statements of one query are one implicit transaction (with ``floor``, the claim
        starts above it, and the statements around the call tell the floor where it may move:
        ``backplane.claims``), and the function sets
        ``synchronous_commit`` on for it: the offsets are durable before the rows come back,
        without BEGIN, SET LOCAL and COMMIT messages of their own
        (docs/decisions/0035-assignment-one-statement-send-overlapped.md). One message and one
        write, not the pipeline's four, nor its Python per statement
        (docs/decisions/0041-relay-cycle-python.md). The outbox's parent table is locked
        before any partition, as everywhere (``backplane.partitions``): the call comes before
        the marks."""
        after = floor.bound(shards, session=session) if floor is not None else 0
        # The floor's readings ride along now and then, not with every call (two statements more).
        reading = floor is not None and floor.reading_due()
        call = _statement(SQL["assign"], [list(shards), limit, only_tenant, list(skip_tenants), after])
        statements = [call]
        if floor is not None and reading:
            statements = [_statement(SQL["claim_horizon"], [floor.sequence]), call, SQL["claim_xid"]]
        statements += [
            _statement(SQL["mark_forwarded"].format(part=part), [ids]) for part, ids in _ids_by_part(forwarded).items()
        ]
        if hoptrace.ON:  # an explicit transaction, to note when its statements were done (bench/hop_trace.py)
            statements = ["BEGIN", *statements, "SELECT clock_timestamp()", "COMMIT"]
        try:
            cur = await session.execute(";\n".join(statements), prepare=False)
        except BaseException:
            # A failed traced call leaves its transaction aborted (the COMMIT was skipped): end
            # it, so the session is usable again (an implicit one ends by itself). A session
            # that cannot even roll back is closed: the caller sees it dead and drops its shards.
            if not session.broken and session.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                try:
                    await session.execute("ROLLBACK")
                except psycopg.Error:
                    await session.close()
            raise
        if hoptrace.ON:
            cur.nextset()  # past BEGIN
        horizon = xid = None
        if reading:
            horizon = await cur.fetchone()
            cur.nextset()
        assigned = await cur.fetchall()
        if reading:
            cur.nextset()
            xid = await cur.fetchone()
        if hoptrace.ON:
            for _ in range(len(statements) - (5 if reading else 3)):  # past the marks, to the clock reading
                cur.nextset()
            stamp = await cur.fetchone()
            self.statements_done_at = stamp[0].timestamp() if stamp else 0.0
        if reading and floor is not None:
            # No row: the sequence's oid is gone (a migration made it anew): looked up again next time.
            floor.sequence = horizon[2] if horizon is not None else None
            if horizon is not None:
                whole = only_tenant is None and not skip_tenants
                top = max((r[0] for r in assigned), default=None)  # r_id
                floor.observe(horizon[0], horizon[1], xid[0] if xid else None, len(assigned), limit, top, whole=whole)
        return rows.in_send_order([rows.pending(r) for r in assigned])

    async def amark_forwarded(self, session: Any, pending: Sequence[Pending]) -> None:
        # A statement per partition (almost always one), each its own transaction: by primary
        # key only and without waiting for the WAL flush (SESSION_SETTINGS;
        # docs/decisions/0012-relay-session-settings.md).
        by_part = _ids_by_part(pending)
        if len(by_part) == 1:
            ((part, ids),) = by_part.items()
            await session.execute(SQL["mark_forwarded"].format(part=part), [ids])
            return
        async with session.pipeline():
            for part, ids in by_part.items():
                await session.execute(SQL["mark_forwarded"].format(part=part), [ids])

    def assign(
        self, shards: Sequence[int], limit: int, *, only_tenant: Any = None, skip_tenants: Sequence[Any] = ()
    ) -> list[Pending]:
        if not shards:
            return []
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(SQL["assign"], [list(shards), limit, only_tenant, list(skip_tenants), None])
            return rows.in_send_order([rows.pending(r) for r in cur.fetchall()])

    def unforwarded(self, shards: Sequence[int], limit: int, *, skip_tenants: Sequence[Any] = ()) -> list[Pending]:
        if not shards:
            return []
        with connection.cursor() as cur:
            cur.execute(SQL["unforwarded"], [list(shards), [_uuid(t) for t in skip_tenants], limit])
            return [rows.pending(r) for r in cur.fetchall()]

    def mark_forwarded(self, ids: Sequence[int], parts: Sequence[str | None] | None = None) -> None:
        if not ids:
            return
        if parts is None:
            parts = [None] * len(ids)
        by_part: dict[str, list[int]] = {}
        for row_id, part in zip(ids, parts, strict=True):
            by_part.setdefault(part or OUTBOX, []).append(row_id)
        with connection.cursor() as cur:
            for part, part_ids in by_part.items():
                cur.execute(SQL["mark_forwarded"].format(part=part), [part_ids])

    def pending_tenants(self, shards: Sequence[int]) -> list[Any]:
        with connection.cursor() as cur:
            cur.execute(SQL["pending_tenants"], [list(shards)])
            return [t for (t,) in cur.fetchall()]

    def ensure_partitions(self) -> int:
        return partitions.ensure_ahead()

    # --- edge side ---------------------------------------------------------------------------

    def ensure_streams(self, tenant_id: uuid.UUID, keys: Sequence[str]) -> dict[str, Head]:
        return self.open_streams(dict.fromkeys(keys, tenant_id))

    def open_streams(self, tenants: Mapping[str, uuid.UUID]) -> dict[str, Head]:
        keys = list(tenants)
        with connection.cursor() as cur:
            cur.execute(
                SQL["ensure_streams"],
                [
                    keys,
                    list(tenants.values()),
                    [streams.audience_of(k) for k in keys],
                    streams.new_epochs(len(keys)),
                ],
            )
        return self.stream_heads(keys)

    def stream_heads(self, keys: Sequence[str]) -> dict[str, Head]:
        if not keys:
            return {}
        cur = _statement_cursor()
        try:
            with connection.wrap_database_errors:
                cur.execute(SQL["stream_heads"], [json.dumps(list(keys))], prepare=conf.PREPARED_STATEMENTS)
                return dict(rows.head(r) for r in cur.fetchall())
        finally:
            cur.close()

    def heads_moved_since(self, since: datetime | None) -> tuple[datetime, dict[str, Head]]:
        cur = _statement_cursor()
        try:
            with connection.wrap_database_errors:
                cur.execute(SQL["heads_moved_since"], [since], prepare=conf.PREPARED_STATEMENTS)
                found = cur.fetchall()
        finally:
            cur.close()
        return found[0][0], dict(rows.head(r[1:]) for r in found if r[1] is not None)

    def read_range(self, stream_key: str, after: int, upto: int) -> list[Item]:
        if upto <= after:
            return []
        with connection.cursor() as cur:
            cur.execute(SQL["read_range"], [stream_key, after, upto])
            return [rows.item(r) for r in cur.fetchall()]

    # --- maintenance -------------------------------------------------------------------------

    cutoff_sql = "now() - make_interval(secs => %s)"

    @contextlib.contextmanager
    def compactor_lock(self) -> Iterator[bool]:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_CLASS, COMPACTOR_LOCK])
            got = bool(cur.fetchone()[0])
        try:
            yield got
        finally:
            if got:
                with connection.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_CLASS, COMPACTOR_LOCK])

    def summarize_indexes(self) -> None:
        """Summarise new page ranges into the ``created_at`` BRIN indexes: compaction finds old
        rows through them, and a range not summarised yet (autovacuum does it too, when it
        runs) is read whole. Never fatal: a role that does not own the indexes, or a lock held
        by a long vacuum (at most a 2 s wait), only leaves the ranges unsummarised this run."""
        try:
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '2s'")
                cur.execute(SQL["summarize_brin"])
        except DatabaseError as exc:
            logger.warning(
                "could not summarise the created_at BRIN indexes (%s); compaction goes on",
                type(exc).__name__,
                extra={"action": "compact_brin"},
            )

    def drop_expired_partitions(self, retention_secs: float) -> tuple[int, int, int]:
        return partitions.drop_expired(retention_secs)

    def expire_keys(self, retention_secs: float, batch: int) -> int:
        with connection.cursor() as cur:
            cur.execute(SQL["expire_keys"], [retention_secs, batch])
            return int(cur.rowcount)

    def reclaim(self, tables: Sequence[str]) -> None:
        """VACUUM (ANALYZE) ``tables`` (not inside a transaction: VACUUM cannot run there)."""
        if connection.in_atomic_block:
            return
        for table in tables:
            try:
                with connection.cursor() as cur:
                    cur.execute(f"VACUUM (ANALYZE) {table}")
            except Exception as exc:  # reclaiming is an optimisation; the next run tries again
                logger.warning("could not vacuum %s: %s", table, type(exc).__name__, extra={"action": "vacuum_failed"})


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _ids_by_part(pending: Sequence[Pending]) -> dict[str, list[int]]:
    """Row ids by partition, each once (a row re-sent by a sweep may be listed twice)."""
    by_part: dict[str, dict[int, None]] = {}
    for p in pending:
        by_part.setdefault(p.part or OUTBOX, {})[p.id] = None
    return {part: list(ids) for part, ids in by_part.items()}


def _statement(sql: str, params: Sequence[Any]) -> str:
    """``sql`` with its ``%s`` placeholders replaced by ``params`` written as literals, for the
    relay's simple queries (``PostgreSQLStore.aassign``). Only what cannot carry a quote: ints,
    UUIDs, None and lists of those; anything else is refused."""
    return sql % tuple(_literal(p) for p in params)


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list | tuple):
        return "'{" + ",".join(_element(v) for v in value) + "}'"
    return _element(value) if isinstance(value, int) else f"'{_element(value)}'"  # a UUID is quoted


def _element(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(int(value))  # int(): an int subclass's own __str__ is not trusted
    if isinstance(value, uuid.UUID):
        return str(uuid.UUID(int=value.int))
    if isinstance(value, str):
        return str(uuid.UUID(value))  # a tenant id as text: only a UUID's characters get through
    raise TypeError(f"no literal for {type(value).__name__}")


# Keys of Django's OPTIONS that are Django's own, not libpq's or psycopg's.
_DJANGO_ONLY_OPTIONS = frozenset({"assume_role", "isolation_level", "pool", "server_side_binding", "prepare_threshold"})


def _conninfo() -> dict[str, Any]:
    """The lease session's connection parameters: Django's (``DATABASES["default"]``, its
    ``OPTIONS`` included, so ``sslmode``, ``sslrootcert``, ``service`` … apply to the session
    that carries every payload too), plus the session's own name, timeout and keepalives."""
    db = connection.settings_dict
    own = {k: v for k, v in (db.get("OPTIONS") or {}).items() if k not in _DJANGO_ONLY_OPTIONS}
    server_options = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
    info: dict[str, Any] = {
        **own,
        "dbname": db["NAME"] or own.get("dbname"),
        "user": db.get("USER") or own.get("user"),
        "password": db.get("PASSWORD") or own.get("password"),
        "host": db.get("HOST") or own.get("host"),
        "port": db.get("PORT") or own.get("port"),
        "connect_timeout": own.get("connect_timeout", 5),
        "application_name": "tyrum-relay-lease",
        # A partitioned relay must lose its locks in seconds, not after the OS's 2-hour
        # keepalive: the server side notices a silent peer through these.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "options": f"{own['options']} {server_options}" if own.get("options") else server_options,
    }
    return {k: v for k, v in info.items() if v is not None}


# --- publishing ------------------------------------------------------------------------------


def _insert(tenant_id: uuid.UUID, shard: int, rows: list[EventRow]) -> None:
    """Check the tenant, insert the event keys with ON CONFLICT DO NOTHING and the outbox rows
    whose keys went in: one statement per chunk (atomic). Raises UnknownTenant or
    InactiveTenant inside the block, so earlier chunks roll back with it."""
    prepare = conf.PREPARED_STATEMENTS
    with transaction.atomic(savepoint=False):
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[start : start + INSERT_CHUNK]
            raw = _statement_cursor()
            if len(chunk) == 1:
                st, eid, et, at, text, size = chunk[0]
                params: list[Any] = [tenant_id, tenant_id, eid, tenant_id, st, et, at, text, size, shard]
                _execute_raw(raw, SQL["publish_one"], params, binary=True, prepare=prepare)
            else:
                _execute_raw(
                    raw, SQL["publish_many"], _many_params(tenant_id, shard, chunk), binary=True, prepare=prepare
                )
            state = raw.fetchone()
            assert state is not None  # the statement always returns its one row
            _tenant_state_ok(state[0], tenant_id)
            raw.close()
    _active_until[tenant_id] = time.monotonic() + TENANT_ACTIVE_SECS


def _append_pipelined(tenant_id: uuid.UUID, shard: int, rows: Iterable[EventRow], count: int) -> list[str]:
    """``append`` for more than a slice of events: one savepoint, the slices' statements
    pipelined. A bad event found after earlier slices went out rolls them back to the
    savepoint, so the caller's transaction stays usable and nothing is written — as when all
    are validated first."""
    prepare = conf.PREPARED_STATEMENTS
    built = iter(rows)
    event_ids: list[str] = []
    seen: set[str] = set()
    sent: list[Any] = []
    with transaction.atomic(), _driver_errors():
        cur = _statement_cursor()
        with cur.connection.pipeline():
            for _ in range(0, count, PIPELINE_SLICE):
                chunk = list(itertools.islice(built, PIPELINE_SLICE))
                event_ids += [row[1] for row in chunk]
                chunk = first_of_each(chunk, seen)
                if chunk:
                    cur = psycopg.Cursor(cur.connection)
                    cur.execute(
                        SQL["publish_many"], _many_params(tenant_id, shard, chunk), binary=True, prepare=prepare
                    )
                    sent.append(cur)
        for cur in sent:
            _tenant_state_ok(cur.fetchone()[0], tenant_id)
            cur.close()
    return event_ids


def _statement_cursor() -> psycopg.Cursor[Any]:
    """A server-side-binding psycopg cursor on Django's connection (in its transaction),
    after any event waiting for the commit (so statements see it and ids keep their order)."""
    connection.ensure_connection()
    _flush(connections[connection.alias])
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


def _many_params(tenant_id: uuid.UUID, shard: int, chunk: Sequence[EventRow]) -> list[Any]:
    """publish_many's parameters: two JSON texts instead of six arrays — the rows' fields
    (encoded by the json module in C) and the payloads, already JSON, joined as they are.
    psycopg's array dumpers work element by element in Python
    (docs/decisions/0008-publish-many-json-texts-and-pipelined-slices.md)."""
    meta = json.dumps(_fields(chunk), separators=(",", ":"))
    payloads = "[" + ",".join(r[4] for r in chunk) + "]"
    return [tenant_id, meta, payloads, tenant_id, tenant_id, shard]


def _fields(chunk: Sequence[EventRow]) -> list[list[Any]]:
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


# --- publish() with the commit -----------------------------------------------------------------
#
# publish() of one event inside a transaction does not send a statement of its own: the event
# waits (an on_commit entry of Django's, so a rolled-back transaction or savepoint drops it as
# it drops the entry) and goes as `SELECT bp_publish_v1(...)` in the COMMIT's own message, one
# simple query — or, if the transaction runs another statement first, just before that
# statement, so the transaction sees its events and their ids keep the order of the calls
# (docs/decisions/0030-publish-rides-the-commit.md). bp_publish_v1 checks the tenant again and
# raises if it is unknown or inactive: then the transaction rolls back whole.

# A tenant a publish statement found active is taken for active this long without asking (the
# call at commit still checks it): its first publish in a while goes at once, and raises there.
TENANT_ACTIVE_SECS = 1.0
_active_until: dict[uuid.UUID, float] = {}
# Django's savepoint statements: an event waiting for the commit need not go before them (a
# rolled-back savepoint drops its on_commit entries, the waiting events among them).
_SAVEPOINT_SQL = ("SAVEPOINT ", "RELEASE SAVEPOINT ", "ROLLBACK TO SAVEPOINT ")
# SQLSTATEs raised by bp_publish_v1.
_UNKNOWN_TENANT, _INACTIVE_TENANT = "BP001", "BP002"


class _AtCommit:
    """An event waiting for its transaction's commit: its call, as SQL with literals, and the
    shard whose doorbell it rings after the commit (None: the caller rings)."""

    __slots__ = ("shard", "sql")

    def __init__(self, sql: str, shard: int | None) -> None:
        self.sql: str | None = sql
        self.shard = shard

    def __call__(self) -> None:
        # An on_commit entry: the event went with the COMMIT (or before a later statement);
        # ringing from here saves publish() a second on_commit entry of its own.
        if self.shard is not None:
            doorbell.ring(self.shard)


def _forget_tenant(sender: Any, instance: Any, **kwargs: Any) -> None:
    _active_until.pop(instance.pk, None)


post_save.connect(_forget_tenant, sender="backplane.Tenant", weak=False)
post_delete.connect(_forget_tenant, sender="backplane.Tenant", weak=False)


def _at_commit_ok(db: Any, tenant_id: uuid.UUID) -> bool:
    """Whether this publish can wait for the commit: inside a transaction, the tenant found
    active lately, string literals read as written (standard_conforming_strings). ``db``: the
    connection wrapper itself (each look-up through ``django.db.connection`` costs ~1.5 µs)."""
    if not (db.in_atomic_block and conf.PUBLISH_AT_COMMIT):
        return False
    if _active_until.get(tenant_id, 0.0) < time.monotonic() or db.needs_rollback:
        return False
    raw = db.connection
    # libpq's own copy of the server's setting, not raw.info's (a new ConnectionInfo and a
    # decode per call); read every time: a SET in the session changes it.
    return raw is not None and raw.pgconn.parameter_status(b"standard_conforming_strings") == b"on"


def _lit(text: str) -> str:
    # standard_conforming_strings is on (_at_commit_ok): only the quote is special. A NUL
    # cannot occur (events.encode refuses it; ids, types and streams are checked patterns).
    return "'" + text.replace("'", "''") + "'" if "'" in text else "'" + text + "'"


def _append_at_commit(db: Any, shard: int, tenant_id: uuid.UUID, row: EventRow, *, ring: bool = False) -> None:
    stream, event_id, etype, at, text, size = row
    sql = (
        f"SELECT bp_publish_v1('{tenant_id}',{_lit(event_id)},{_lit(stream)},{_lit(etype)},"
        f"'{at.isoformat()}',{_lit(text)},{size},{shard})"
    )
    db.on_commit(_AtCommit(sql, shard if ring else None))
    if not getattr(db, "_bp_at_commit", False):
        _hook(db)
    if _flush_before not in db.execute_wrappers:
        db.execute_wrappers.append(_flush_before)


def _hook(db: Any) -> None:
    """Send waiting events with the COMMIT: the wrapper's commit, once per wrapper."""
    plain = db._commit
    db._commit = lambda: _commit_with_events(db, plain)
    db._bp_at_commit = True


def _waiting(db: Any) -> list[_AtCommit]:
    return [f for _sids, f, _robust in db.run_on_commit if type(f) is _AtCommit and f.sql is not None]


def _commit_with_events(db: Any, plain: Any) -> Any:
    waiting = _waiting(db) if db.run_on_commit else []
    if waiting and db.connection is not None:
        if _flush_before in db.execute_wrappers:
            db.execute_wrappers.remove(_flush_before)
        try:
            _send(db, waiting, "; COMMIT")
        except BaseException:
            # Nothing of the transaction is kept: roll it back here (Django's atomic rolls back
            # only after a database error of its own) and drop its on_commit entries.
            db.run_on_commit = []
            with contextlib.suppress(Exception):
                db.connection.rollback()
            raise
        if db.connection.pgconn.transaction_status == _IDLE:
            # Our COMMIT ended the transaction: Django's own commit would only find nothing to
            # send, through its debug and error wrappers and psycopg's lock and generator.
            return None
    return plain()


def _flush_before(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
    """Django's execute wrapper while events wait: send them before the statement."""
    if not (isinstance(sql, str) and sql.startswith(_SAVEPOINT_SQL)):
        _flush(context["connection"])
    return execute(sql, params, many, context)


def _flush(db: Any) -> None:
    """Send the events waiting for the commit now, in the transaction."""
    if _flush_before in db.execute_wrappers:
        db.execute_wrappers.remove(_flush_before)
        waiting = _waiting(db)
        if waiting:
            _send(db, waiting, "")


def _send(db: Any, waiting: list[_AtCommit], tail: str) -> None:
    text = "; ".join(f.sql for f in waiting if f.sql is not None) + tail
    for f in waiting:
        f.sql = None
    conn = db.connection
    try:
        with db.wrap_database_errors:
            # libpq's PQexec, not a psycopg cursor: one simple query (COMMIT included) and one
            # result to check; the cursor's machinery cost ~25 µs of CPU per commit
            # (docs/decisions/0034-publish-cheaper-in-python.md). PQexec blocks even on a
            # non-blocking connection, with the GIL released, as a cursor's wait does.
            with conn.lock:
                result = conn.pgconn.exec_(text.encode())
            if result.status not in _EXEC_OK:
                raise _exec_error(conn, result)
    except OperationalError as exc:
        raise exceptions.StoreUnavailable(type(exc).__name__) from None
    except DatabaseError as exc:
        state = getattr(exc.__cause__, "sqlstate", None)
        if state in (_UNKNOWN_TENANT, _INACTIVE_TENANT):
            _active_until.clear()
        if state == _UNKNOWN_TENANT:
            raise exceptions.UnknownTenant("no such tenant (found at commit)") from None
        if state == _INACTIVE_TENANT:
            raise exceptions.InactiveTenant("the tenant is not active (found at commit)") from None
        raise exceptions.PublishError(f"the database refused the events ({type(exc).__name__})") from None


_EXEC_OK = (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK)
_IDLE = psycopg.pq.TransactionStatus.IDLE


def _exec_error(conn: psycopg.Connection[Any], result: Any) -> psycopg.Error:
    """The psycopg error a cursor would have raised for ``result``: OperationalError when the
    connection is lost, else the one of its SQLSTATE (with ``sqlstate`` and ``diag`` set)."""
    if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
        return psycopg.OperationalError("the connection was lost")
    return psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
