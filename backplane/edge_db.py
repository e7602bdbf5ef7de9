"""The edge's database calls: a socket's own work (credential check, directory row, heads, a
replay, a gap fill) run from the event loop on worker threads.

On PostgreSQL they run on the shared worker threads (each with its own connection), so
handshakes and replays of many peers overlap; SQLite keeps its one thread (one writer).
Django's per-call health check (a ``SELECT 1`` round trip) is skipped: a dead connection fails
the call instead (503 or 4001, the peer retries) and is discarded. After a call failed on its
connection the checks run again for ``SUSPECT_SECS``: after an outage every worker thread holds
a dead connection (docs/decisions/0019-edge-database-calls.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async

from backplane import exceptions
from backplane.store import get_store

# How long after a failed database call the edge checks its connections before using them.
SUSPECT_SECS = 60.0
_suspect_until = 0.0


def call(fn: Callable[..., Any]) -> Any:
    """``database_sync_to_async(fn)`` for the edge, as the module docstring says."""

    def run(*args: Any) -> Any:
        from django.db import InterfaceError, OperationalError, connection

        global _suspect_until
        if connection.connection is not None and time.monotonic() >= _suspect_until:
            connection.health_check_done = True  # type: ignore[attr-defined]  # Django >= 4.1, not in its stubs
        try:
            return fn(*args)
        except (OperationalError, InterfaceError, exceptions.StoreUnavailable) as exc:
            cause = exc.__cause__ if isinstance(exc, exceptions.StoreUnavailable) else exc
            if isinstance(cause, OperationalError | InterfaceError):  # the connection, not the query
                _suspect_until = time.monotonic() + SUSPECT_SECS
            raise

    return database_sync_to_async(run, thread_sensitive=get_store().single_thread)
