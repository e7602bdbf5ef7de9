"""Scratch PostgreSQL databases, and Django set up on one, for benchmarks.

Each database is named after the run (``scratch_name``): several people may benchmark on
one machine at once. ``BENCH_PG_ADMIN_URL`` names the server and a database to connect to
for creating and dropping.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

from harness.procs import PYTHON, ROOT

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def scratch_name(name: str) -> str:
    """A database name of this run's own."""
    return f"{name}_{os.getpid()}"


def scratch_database(name: str, redis_url: str) -> str:
    """(Re)create database ``name`` and migrate it; return its URL (``drop_database`` after).

    ``BENCH_AUTO_EXPLAIN_MS`` (diagnosis): plans of statements slower than this many ms go to
    the server's log."""
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    from harness.env import RUN_REDIS_KEY

    # As the cluster's processes will run (harness.env.service_env): keys on, checks pass.
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "BACKPLANE_REDIS_KEYS": os.environ.get("BACKPLANE_REDIS_KEYS", RUN_REDIS_KEY),
    }
    subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=120)  # noqa: S603
    slow_ms = os.environ.get("BENCH_AUTO_EXPLAIN_MS")
    if slow_ms:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for setting, value in (
                ("session_preload_libraries", "auto_explain"),
                ("auto_explain.log_min_duration", str(int(slow_ms))),
                ("auto_explain.log_analyze", "on"),
                ("auto_explain.log_buffers", "on"),
            ):
                conn.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
    return url


def drop_database(name: str) -> None:
    """Drop database ``name`` (closing this process's Django connections first)."""
    import psycopg

    with contextlib.suppress(Exception):
        from django.db import connections

        connections.close_all()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django(database_url: str, redis_url: str, channel_prefix: str) -> None:
    """Set Django up in this process on ``database_url``, ``redis_url`` and ``channel_prefix``."""
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    os.environ["BACKPLANE_CHANNEL_PREFIX"] = channel_prefix
    from harness.env import RUN_REDIS_KEY

    os.environ.setdefault("BACKPLANE_REDIS_KEYS", RUN_REDIS_KEY)  # the cluster's (env.service_env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
