"""The storage seam (``base.Store``) and its two implementations, picked by ``get_store()``.

``get_store()`` is the one place that asks which database runs: PostgreSQL (clusters) or
SQLite (the embedded mode). Statements live in ``sql/``; rows come back as the dataclasses
of ``rows``.
"""

from __future__ import annotations

from backplane.store.base import EVENTKEY, OUTBOX, STREAM, Store
from backplane.store.rows import Head, Item, Pending

__all__ = ["EVENTKEY", "OUTBOX", "STREAM", "Head", "Item", "Pending", "Store", "get_store"]

_store: Store | None = None


def get_store() -> Store:
    """The store of the default database's backend, made on first use."""
    global _store
    if _store is None:
        from django.db import connection

        if connection.vendor == "postgresql":
            from backplane.store.postgresql import PostgreSQLStore

            _store = PostgreSQLStore()
        else:
            from backplane.store.sqlite import SQLiteStore

            _store = SQLiteStore()
    return _store
