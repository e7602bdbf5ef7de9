"""The heartbeat's refresh of its sockets' rows (decision 0045): HOT updates on PostgreSQL, and
a sweep per beat that removes quiet edges and their rows without looking at every row."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from backplane import directory
from backplane.conf import conf
from backplane.models import Connection, Edge

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tenant(tenant_factory):  # type: ignore[no-untyped-def]
    return tenant_factory("acme")


def _rows(tenant, edge: Edge, n: int, expires_in: float = 60.0) -> list[dict[str, str]]:
    expires = timezone.now() + timedelta(seconds=expires_in)
    rows = [
        {
            "connection_id": f"{edge.edge_id}-c{i}",
            "tenant_id": tenant.id,
            "device_id": f"d{i}",
            "role": "client",
            "channel_name": "c",
        }
        for i in range(n)
    ]
    Connection.objects.bulk_create([Connection(edge=edge, expires_at=expires, **row) for row in rows])
    return rows


def test_beat__refreshes_every_row_in_place_as_a_hot_update(tenant):
    edge = Edge.objects.create(edge_id="edge-hot")
    rows = _rows(tenant, edge, 200, expires_in=1)
    before = dict(Connection.objects.values_list("connection_id", "expires_at"))

    with transaction.atomic():  # the transaction's own counters: no wait for the statistics
        directory.beat(edge.edge_id, rows)
        with connection.cursor() as cur:
            cur.execute(
                "SELECT pg_stat_get_xact_tuples_updated(%s::regclass),"
                " pg_stat_get_xact_tuples_hot_updated(%s::regclass)",
                ["backplane_connection", "backplane_connection"],
            )
            updated, hot = cur.fetchone()

    after = dict(Connection.objects.values_list("connection_id", "expires_at"))
    assert all(after[k] > before[k] for k in before)  # every row was refreshed
    assert updated == 200
    assert hot == 200  # an index on expires_at (or last_seen_at) would make these 0


def test_beat__its_sweep_removes_quiet_edges_with_their_rows_and_keeps_the_rest(tenant):
    now = timezone.now()
    quiet_for = timedelta(seconds=conf.CONNECTION_TTL_SECS + 5)
    me, other, quiet = (Edge.objects.create(edge_id=e) for e in ("edge-me", "edge-other", "edge-quiet"))
    Edge.objects.filter(edge_id__in=["edge-me", "edge-quiet"]).update(heartbeat_at=now - quiet_for)
    mine = _rows(tenant, me, 2, expires_in=-5)  # the calling edge: alive whatever its rows say
    _rows(tenant, other, 2)
    _rows(tenant, quiet, 3, expires_in=-5)
    # An edge still beating whose refresh failed: invisible to readers, left for compaction.
    Connection.objects.filter(connection_id="edge-other-c1").update(expires_at=now - timedelta(seconds=1))

    directory.beat(me.edge_id, mine)

    assert set(Edge.objects.values_list("edge_id", flat=True)) == {"edge-me", "edge-other"}
    assert set(Connection.objects.values_list("connection_id", flat=True)) == {
        "edge-me-c0",
        "edge-me-c1",
        "edge-other-c0",
        "edge-other-c1",
    }
    assert Connection.objects.filter(edge_id="edge-me", expires_at__gt=now).count() == 2
    assert directory.sweep() == (1, 0)  # compaction's sweep: every expired row


def test_beat__its_sweep_reads_no_connection_row_for_expiry(tenant):
    """The beat's sweep does not look for expired rows at all: on a table without an index on
    ``expires_at`` that is a scan of every row, every beat of every edge."""
    edge = Edge.objects.create(edge_id="edge-scan")
    rows = _rows(tenant, edge, 3)
    queries: list[str] = []

    def record(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        directory.beat(edge.edge_id, rows)

    # Django writes the column quoted: any look for expired rows, SELECT or DELETE, compares it.
    looked = [q for q in queries if '"expires_at" <' in q]
    assert any('"expires_at" =' in q for q in queries)  # the refresh itself was seen
    assert looked == []
