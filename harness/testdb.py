"""The test database for tests that share committed data with other threads or processes
(in-process edges, e2e clusters), instead of pytest-django's per-test transaction or flush."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from django.conf import settings

# The database name before pytest-django renames it to the test database's (this module is
# imported by tests/conftest.py, before any database is set up).
CONFIGURED_NAME = settings.DATABASES["default"]["NAME"]


@contextlib.contextmanager
def test_database(django_db_blocker: Any) -> Iterator[None]:
    """Make sure the test database exists while the context lasts, even when no collected
    test requests ``db``/``transactional_db`` (pytest-django then creates none). Never let a
    test or a child process near the configured, non-test database."""
    from django.test.utils import setup_databases, teardown_databases

    created = None
    if settings.DATABASES["default"]["NAME"] == CONFIGURED_NAME:
        with django_db_blocker.unblock():
            created = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    assert settings.DATABASES["default"]["NAME"] != CONFIGURED_NAME, "no test database"
    try:
        yield
    finally:
        if created is not None:
            with django_db_blocker.unblock():
                teardown_databases(created, verbosity=0)


@contextlib.contextmanager
def committed_database(django_db_blocker: Any) -> Iterator[None]:
    """Committed, shared data for a module's tests, emptied when the module is done.

    Not ``transactional_db``: its flush after every test costs most of a second on
    PostgreSQL, and the tests need no clean slate: each makes its own tenants and tokens,
    and every assertion is about its own tenant. Writes commit at once (autocommit), so
    other threads and child processes see them. The module ends with the flush
    ``transactional_db`` would run, so later tests find an empty database.

    ``CONN_MAX_AGE`` is 0 meanwhile: each thread's connection closes after its call
    (``database_sync_to_async`` closes obsolete ones), so none outlives the module — an open
    one would keep the test database from being dropped at the end of the session.
    """
    from django.core.management import call_command
    from django.db import connections

    assert settings.DATABASES["default"]["NAME"] != CONFIGURED_NAME, "no test database"
    shared = connections["default"].settings_dict  # one dict, shared by every thread's connection
    max_age = shared.get("CONN_MAX_AGE", 0)
    shared["CONN_MAX_AGE"] = 0
    with django_db_blocker.unblock():
        try:
            yield
        finally:
            call_command("flush", verbosity=0, interactive=False)
            connections.close_all()
            shared["CONN_MAX_AGE"] = max_age
