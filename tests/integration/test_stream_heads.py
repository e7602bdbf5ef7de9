"""The relay's head bumps are HOT updates of backplane_stream (docs/decisions/0036-hot-stream-heads.md)."""

from __future__ import annotations

import time

import pytest
from django.db import connection

from backplane import outbox
from backplane.models import Tenant
from backplane.store import get_store

from .helpers import TIMEOUT

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ALL = list(range(16))
BUMPS = 8


def stream_updates(at_least: int = 0) -> tuple[int, int]:
    """backplane_stream's (updates, HOT updates) so far, with this session's own counts in them;
    waits (bounded) until the updates reach ``at_least``."""
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")  # flushed when the session goes idle
    deadline = time.monotonic() + TIMEOUT
    while True:
        with connection.cursor() as cur:
            cur.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'backplane_stream'")
            upd, hot = cur.fetchone()
        if upd >= at_least or time.monotonic() > deadline:
            return upd, hot
        time.sleep(0.05)


def test_assign__repeated_head_bumps_of_a_stream_are_hot_updates() -> None:
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    store = get_store()
    outbox.publish(tenant, "a.b", {"n": 0}, device="dev-1")
    store.assign(ALL, 10)  # inserts the stream's row
    upd0, hot0 = stream_updates()
    for n in range(1, BUMPS + 1):  # a transaction each, as the relay's assignments: updated_at moves
        outbox.publish(tenant, "a.b", {"n": n}, device="dev-1")
        assert len(store.assign(ALL, 10)) == 1
    upd, hot = stream_updates(upd0 + BUMPS)
    assert upd - upd0 >= BUMPS
    # The 10-second bucket changes at most once in these milliseconds: only that bump is not HOT.
    assert hot - hot0 >= (upd - upd0) - 1
