"""The environment of child processes (edges, relays, commands, load clients)."""

from __future__ import annotations

import os
import secrets

# Cluster processes refuse the public development SECRET_KEY (backplane.asgi): children of a
# run without one share this key, made once per run.
RUN_SECRET_KEY = "tyrum-harness-" + secrets.token_hex(16)
# A benchmark cluster's Redis key when the environment gives none (all its processes share it).
RUN_REDIS_KEY = "tyrum-harness-redis-" + secrets.token_hex(16)


def _secret_key() -> str:
    from backplane.conf import DEVELOPMENT_SECRET_KEY

    configured = os.environ.get("SECRET_KEY", "")
    return configured if configured and configured != DEVELOPMENT_SECRET_KEY else RUN_SECRET_KEY


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
    env["SECRET_KEY"] = _secret_key()
    # The children encrypt with this run's Redis keys; a run without keys has them trust Redis.
    keys = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("symmetric_encryption_keys")
    env["BACKPLANE_REDIS_KEYS" if keys else "BACKPLANE_REDIS_TRUSTED"] = ",".join(keys) if keys else "true"
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
        "SECRET_KEY": _secret_key(),
        # Clusters as deployed: every message on Redis encrypted (bench/encryption_cost.py: the cost).
        "BACKPLANE_REDIS_KEYS": os.environ.get("BACKPLANE_REDIS_KEYS", RUN_REDIS_KEY),
        **extra,
    }
