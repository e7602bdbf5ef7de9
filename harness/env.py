"""The environment of child processes (edges, relays, commands, load clients)."""

from __future__ import annotations

import os


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment with the database, Redis and channel prefix Django uses
    here (a test run's test database), for a child that must share them."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        user = db.get("USER") or "postgres"
        env["DATABASE_URL"] = f"postgres://{user}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"
    env["REDIS_URL"] = settings.REDIS_URL
    env["BACKPLANE_CHANNEL_PREFIX"] = settings.BACKPLANE_CHANNEL_PREFIX
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def service_env(database_url: str, redis_url: str, channel_prefix: str, **extra: str) -> dict[str, str]:
    """This process's environment pointed at ``database_url``, ``redis_url`` and a channel
    prefix of its own, logging warnings only (a benchmark's processes)."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "BACKPLANE_CHANNEL_PREFIX": channel_prefix,
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
