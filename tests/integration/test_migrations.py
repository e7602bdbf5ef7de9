"""Migrations: history that imports no app code, and a schema from zero that the code expects.

A database of its own is made and migrated from zero by ``manage.py migrate`` in a child
process; every named statement of the PostgreSQL store then runs on it (on empty tables, in a
transaction rolled back) and must return the columns its row mapping reads
(``backplane.store.rows``); ``bp_assign_v2`` must exist with those result columns; the outbox
must be partitioned with its indexes. The checks are shown to fail on a missing column and a
missing function version.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings

from backplane.store import OUTBOX, queries, rows
from backplane.store.postgresql import SQL
from harness.env import child_env
from harness.procs import ROOT, manage

pytestmark = [pytest.mark.integration]

MIGRATIONS = Path(ROOT) / "backplane" / "migrations"
# Django writes references to model-state classes by import path: 0006 names the index class
# ``backplane.models.BrinOnPostgres`` (a class of the model state, not logic of the app).
MODEL_STATE_IMPORTS = {("0006_created_at_brin", "backplane.models"), ("0017_stream_moved_bucket", "backplane.models")}
VERSIONED_SQL = re.compile(r"^[a-z][a-z0-9_]*_v\d+\.sql$")

TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
# Parameters for each named statement (a statement added without them fails the test), and
# the columns it must return.
STATEMENTS: dict[str, tuple[list[Any], tuple[str, ...] | None]] = {
    "publish_one": ([TENANT, TENANT, "e-1", TENANT, "t:x", "a.b", NOW, "{}", 2, 0], None),
    "publish_many": (
        [TENANT, json.dumps([["t:x", "e-1", "a.b", NOW.isoformat(), 2]]), "[{}]", TENANT, TENANT, 0],
        None,
    ),
    "assign": ([[0, 1], 10, None, [TENANT], 0], tuple(f"r_{c}" for c in rows.PENDING_COLUMNS)),
    "claim_horizon": ([None], None),
    "claim_xid": ([], None),
    "mark_forwarded": ([[1, 2]], None),
    "unforwarded": ([[0, 1], [TENANT], 10], rows.PENDING_COLUMNS),
    "pending_tenants": ([[0, 1]], ("tenant_id",)),
    "ensure_streams": ([["t:x"], [TENANT], ["tenant"], ["abcd1234"]], None),
    "stream_heads": ([json.dumps(["t:x"])], rows.HEAD_COLUMNS),
    "heads_moved_since": ([NOW], ("now", *rows.HEAD_COLUMNS)),
    "read_range": (["t:x", 0, 10], rows.ITEM_COLUMNS),
    "take_shards": ([0x7479, [0, 1]], None),
    "expire_keys": ([3600.0, 10], None),
    "summarize_brin": ([], None),
}


def run(conn: psycopg.Connection[Any], sql: str, params: list[Any]) -> tuple[str, ...] | None:
    """Run one statement in a transaction that is rolled back; return its result columns."""
    try:
        with conn.transaction(force_rollback=True):
            cur = conn.execute(sql.format(part=OUTBOX), params or None)
            return tuple(d.name for d in cur.description) if cur.description else None
    finally:
        conn.execute("SELECT pg_advisory_unlock_all()")


def function_result_columns(conn: psycopg.Connection[Any], name: str) -> list[tuple[str, str]]:
    """The (name, type) of the result columns of the function ``name`` (empty if none exists)."""
    cur = conn.execute(
        "SELECT a.name, format_type(a.type, NULL) FROM pg_proc p, "
        "unnest(p.proargnames, p.proallargtypes, p.proargmodes) AS a(name, type, mode) "
        "WHERE p.proname = %s AND a.mode = 't'",
        [name],
    )
    return cur.fetchall()


@pytest.fixture(scope="module")
def fresh() -> Iterator[tuple[psycopg.Connection[Any], dict[str, str]]]:
    """A database of its own, migrated from zero; a connection to it and the env to migrate it."""
    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.fail("needs DATABASE_URL=postgres://… (run it with `make test`)")
    db = settings.DATABASES["default"]
    name = f"{db['NAME'][:40]}_schema_{uuid.uuid4().hex[:8]}"
    server = {
        "host": db.get("HOST") or "127.0.0.1",
        "port": db.get("PORT") or 5432,
        "user": db.get("USER") or "postgres",
    }
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        env = child_env(DATABASE_URL=f"postgres://{server['user']}@{server['host']}:{server['port']}/{name}")
        manage("migrate", "--no-input", "-v", "0", env=env, timeout=120)
        with psycopg.connect(dbname=name, autocommit=True, **server) as conn:
            yield conn, env
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- history imports no app code ------------------------------------------------------------


def forbidden_references(module: str, source: str) -> list[str]:
    """What a migration's source takes from outside its own history: imports of ``backplane``
    modules other than ``backplane.migrations`` (and Django's model-state references), and SQL
    files other than a released, versioned one (``name_vN.sql``) that exists."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"backplane.{a.name}" for a in node.names] if node.module == "backplane" else [node.module]
        elif isinstance(node, ast.Call) and _called(node.func) in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            names = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ["<dynamic>"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".sql"):
            sql = Path(node.value).name
            if not VERSIONED_SQL.match(sql) or not (queries.SQL_DIR / sql).is_file():
                found.append(f"reads {node.value}")
        for name in names:
            parts = name.split(".")
            if name == "<dynamic>":
                found.append("imports a module named at run time")
            elif parts[0] != "backplane" or name == "backplane" or parts[1] == "migrations":
                continue
            elif (module, name) not in MODEL_STATE_IMPORTS:
                found.append(f"imports {name}")
    return sorted(set(found))


def _called(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def test_migrations__import_no_app_code_and_read_only_versioned_sql() -> None:
    checked = sorted(MIGRATIONS.glob("0*.py"))
    assert len(checked) >= 10
    problems = {p.stem: forbidden_references(p.stem, p.read_text()) for p in checked}
    assert {name: found for name, found in problems.items() if found} == {}


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from backplane.partitions import convert_outbox", ["imports backplane.partitions"]),
        ("from backplane import partitions", ["imports backplane.partitions"]),
        ("import backplane.outbox", ["imports backplane.outbox"]),
        ("x = importlib.import_module('backplane.store.postgresql')", ["imports backplane.store.postgresql"]),
        ("SOURCE = SQL_DIR / 'postgresql.sql'", ["reads postgresql.sql"]),
        ("SOURCE = SQL_DIR / 'bp_assign_v9.sql'", ["reads bp_assign_v9.sql"]),
        ("from backplane.models import BrinOnPostgres", ["imports backplane.models"]),
        ("import importlib; importlib.import_module('backplane.migrations.0008_assign_function')", []),
        ("SOURCE = SQL_DIR / 'bp_assign_v2.sql'", []),
    ],
)
def test_migrations__the_import_check_finds_app_code(source: str, found: list[str]) -> None:
    assert forbidden_references("0099_example", source) == found


# --- the schema from zero -------------------------------------------------------------------


def test_migrate_from_zero__every_named_statement_runs_and_returns_the_mapped_columns(fresh) -> None:
    conn, _ = fresh
    assert sorted(STATEMENTS) == sorted(SQL), "give every named statement parameters here"
    for name, (params, columns) in STATEMENTS.items():
        got = run(conn, SQL[name], params)
        if columns is not None:
            assert got == columns, name


def test_migrate_from_zero__the_function_version_called_exists_with_the_mapped_result_columns(fresh) -> None:
    conn, _ = fresh
    assert "bp_assign_v4(" in SQL["assign"]
    got = function_result_columns(conn, "bp_assign_v4")
    assert [name for name, _ in got] == [f"r_{c}" for c in rows.PENDING_COLUMNS]
    assert dict(got)["r_id"] == "bigint" and dict(got)["r_tenant_id"] == "uuid"


def test_schema_checks__fail_on_a_missing_column_and_a_missing_function_version(fresh) -> None:
    conn, _ = fresh
    with pytest.raises(psycopg.errors.UndefinedColumn):
        run(conn, SQL["read_range"].replace("event_id", "event_key"), STATEMENTS["read_range"][0])
    with pytest.raises(psycopg.errors.UndefinedFunction):
        run(conn, SQL["assign"].replace("bp_assign_v4", "bp_assign_v9"), STATEMENTS["assign"][0])
    assert function_result_columns(conn, "bp_assign_v9") == []


def test_migrate_from_zero__outbox_is_partitioned_with_its_indexes(fresh) -> None:
    conn, _ = fresh
    cur = conn.execute(
        "SELECT p.partstrat, a.attname, d.relname FROM pg_partitioned_table p "
        "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0] "
        "LEFT JOIN pg_class d ON d.oid = p.partdefid WHERE p.partrelid = to_regclass(%s)",
        [OUTBOX],
    )
    assert cur.fetchall() == [("r", "created_at", f"{OUTBOX}_default")]
    cur = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s ORDER BY indexname", [OUTBOX])
    assert [r[0] for r in cur.fetchall()] == [
        "backplane_outboxitem_pkey_p",
        "bp_outbox_created_brin",
        "bp_outbox_stream_offset",
        "bp_outbox_unassigned_id",
        "bp_outbox_unforwarded",
    ]
    # Partitions ahead exist (as 0002 named them), and each has every index of the parent.
    cur = conn.execute(
        "SELECT c.relname, (SELECT count(*) FROM pg_index x WHERE x.indrelid = c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
        [OUTBOX],
    )
    parts = dict(cur.fetchall())
    assert any(re.fullmatch(rf"{OUTBOX}_p\d{{8}}_\d{{6}}", name) for name in parts), parts
    assert set(parts.values()) == {5}, parts


def test_migrate__0010_reverses_to_the_old_function_and_forwards_again(fresh) -> None:
    """Last in this module: it migrates the shared database back and forth."""
    conn, env = fresh
    manage("migrate", "backplane", "0009", "--no-input", "-v", "0", env=env, timeout=120)
    assert function_result_columns(conn, "bp_assign_v2") == []
    assert [n for n, _ in function_result_columns(conn, "bp_assign")] == [f"r_{c}" for c in rows.PENDING_COLUMNS]
    manage("migrate", "--no-input", "-v", "0", env=env, timeout=120)
    assert run(conn, SQL["assign"], STATEMENTS["assign"][0]) == tuple(f"r_{c}" for c in rows.PENDING_COLUMNS)


def test_migrate__0016_reverses_keeping_the_previous_version_and_forwards_again(fresh) -> None:
    """An upgrade keeps bp_assign_v2 for the relays of the release before (last with 0010's:
    it migrates the shared database back and forth)."""
    conn, env = fresh
    columns = [f"r_{c}" for c in rows.PENDING_COLUMNS]
    assert [n for n, _ in function_result_columns(conn, "bp_assign_v2")] == columns
    manage("migrate", "backplane", "0015", "--no-input", "-v", "0", env=env, timeout=120)
    assert function_result_columns(conn, "bp_assign_v3") == []
    assert [n for n, _ in function_result_columns(conn, "bp_assign_v2")] == columns
    manage("migrate", "--no-input", "-v", "0", env=env, timeout=120)
    assert [n for n, _ in function_result_columns(conn, "bp_assign_v3")] == columns


def test_migrate__0019_reverses_keeping_the_previous_version_and_forwards_again(fresh) -> None:
    """An upgrade keeps bp_assign_v3 for the relays of the release before (which call it
    without a claim floor)."""
    conn, env = fresh
    columns = [f"r_{c}" for c in rows.PENDING_COLUMNS]
    manage("migrate", "backplane", "0018", "--no-input", "-v", "0", env=env, timeout=120)
    assert function_result_columns(conn, "bp_assign_v4") == []
    assert [n for n, _ in function_result_columns(conn, "bp_assign_v3")] == columns
    manage("migrate", "--no-input", "-v", "0", env=env, timeout=120)
    assert [n for n, _ in function_result_columns(conn, "bp_assign_v4")] == columns
    assert [n for n, _ in function_result_columns(conn, "bp_assign_v3")] == columns


def test_migrate__0017_reverses_to_the_updated_at_index_and_forwards_again(fresh) -> None:
    """The head check's bucket is generated by the database (relays of the release before keep
    it right) and the table keeps room for HOT updates (last with 0010's: it migrates the shared
    database back and forth)."""
    conn, env = fresh

    def schema() -> tuple[set[str], str | None, list[str] | None]:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'backplane_stream'")}
        generated = conn.execute(
            "SELECT attgenerated FROM pg_attribute WHERE attrelid = 'backplane_stream'::regclass "
            "AND attname = 'moved_bucket' AND NOT attisdropped"
        ).fetchone()
        options = conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'backplane_stream'::regclass").fetchone()
        return indexes, generated and generated[0], options and options[0]

    indexes, generated, options = schema()
    assert "bp_stream_moved" in indexes and "bp_stream_updated" not in indexes
    assert generated == "s" and options == ["fillfactor=80"]
    manage("migrate", "backplane", "0016", "--no-input", "-v", "0", env=env, timeout=120)
    indexes, generated, options = schema()
    assert "bp_stream_updated" in indexes and "bp_stream_moved" not in indexes
    assert generated is None and options is None
    manage("migrate", "--no-input", "-v", "0", env=env, timeout=120)
    assert schema() == (indexes - {"bp_stream_updated"} | {"bp_stream_moved"}, "s", ["fillfactor=80"])


def test_migrate__0018_reverses_to_the_expires_index_and_forwards_again(fresh) -> None:
    """The heartbeat's refresh is a HOT update: no index on ``expires_at``, room on each page
    (last with 0010's: it migrates the shared database back and forth)."""
    conn, env = fresh

    def schema() -> tuple[bool, list[str] | None]:
        table = "backplane_connection"
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", [table])}
        options = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", [table]).fetchone()
        return "bp_conn_expires" in indexes, options and options[0]

    assert schema() == (False, ["fillfactor=50"])
    manage("migrate", "backplane", "0017", "--no-input", "-v", "0", env=env, timeout=120)
    assert schema() == (True, None)
    manage("migrate", "--no-input", "-v", "0", env=env, timeout=120)
    assert schema() == (False, ["fillfactor=50"])
