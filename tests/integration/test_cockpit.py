"""The admin's cockpit (backplane/cockpit.py): the status page, its confirmed and audited
commands, and the outbox list's filters, links and capped counts (backplane/admin.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backplane import admin as bp_admin
from backplane import directory, outbox
from backplane.conf import conf
from backplane.models import Connection, Edge, OutboxItem, RelayLease
from backplane.store import OUTBOX, get_store

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STATUS = "/admin/backplane/edge/status/"


def staff(*codenames: str) -> Client:
    user = get_user_model().objects.create_user(f"op-{len(codenames)}-{'-'.join(codenames)}"[:150], is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="backplane", codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def commands_to(edge_id: str) -> list[str]:
    return list(OutboxItem.objects.filter(kind="command", stream=f"e:{edge_id}").values_list("type", flat=True))


@pytest.fixture
def cluster_state(tenant_factory):
    tenant = tenant_factory("acme")
    for shard in range(conf.SHARDS):
        RelayLease.objects.create(shard=shard, holder="relay-1:7" if shard < 8 else "", heartbeat_at=timezone.now())
    for edge_id in ("edge-a", "edge-b"):
        directory.register_edge(edge_id)
    Connection.objects.create(connection_id="c1", tenant=tenant, device_id="dev-1", role="client", edge_id="edge-a",
                              channel_name="x", expires_at=timezone.now() + timedelta(seconds=60))
    outbox.publish_many(tenant, [{"type": "cockpit.t", "payload": {"i": i}} for i in range(3)])
    return tenant


def test_status_page__shows_backlog_relays_and_edges_to_who_may_view_edges(cluster_state):
    assert staff().get(STATUS).status_code == 403
    page = staff("view_edge").get(STATUS)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-unassigned="3"' in html
    assert "relay-1:7" in html and f"8-{conf.SHARDS - 1}" in html and "no live relay" in html
    assert 'data-edge="edge-a"' in html and 'data-edge="edge-b"' in html
    assert "bp-drain" not in html  # no drain button without change_edge
    edges = {e["edge_id"]: e["n"] for e in page.context["edges"]}
    assert edges == {"edge-a": 1, "edge-b": 0}
    assert sum(u for _, u, _ in page.context["backlog_by_shard"]) == 3
    assert page.context["recent"]["published"] == pytest.approx(3 / 60)


def test_admin_index__links_the_status_page():
    html = staff("view_edge").get("/admin/").content.decode()
    assert f'href="{STATUS}"' in html


def test_drain__asks_first_then_sends_the_command_and_audits_it(cluster_state):
    client = staff("view_edge", "change_edge")
    assert staff("view_edge").get(STATUS + "drain/edge-a/").status_code == 403
    confirm = client.get(STATUS + "drain/edge-a/")
    assert confirm.status_code == 200 and "Its 1 connection(s) close with 4001" in confirm.content.decode()
    assert client.post(STATUS + "drain/edge-a/", {}).status_code == 200  # no "post=yes": asked again
    assert commands_to("edge-a") == []
    done = client.post(STATUS + "drain/edge-a/", {"post": "yes"})
    assert done.status_code == 302 and done["Location"] == STATUS
    assert commands_to("edge-a") == ["bp.drain"]
    entry = LogEntry.objects.get()
    assert entry.object_id == "edge-a" and "Drained" in entry.get_change_message()


def test_disconnect_and_resync__send_directed_commands_to_the_edges_holding_the_device(cluster_state):
    client = staff("view_edge", "change_connection")
    assert client.get(STATUS + "disconnect/?tenant=acme&device=dev-1").status_code == 200
    assert client.post(STATUS + "disconnect/", {"tenant": "acme", "device": "dev-1", "post": "yes"}).status_code == 302
    assert client.post(STATUS + "resync/", {"tenant": "acme", "device": "", "post": "yes"}).status_code == 302
    assert commands_to("edge-a") == ["bp.disconnect", "bp.resync"] and commands_to("edge-b") == []
    assert [e.get_change_message() for e in LogEntry.objects.order_by("id")] == [
        "Disconnected device dev-1 (4008) from the status page",
        "Resynced every device of acme (4409) from the status page",
    ]
    assert client.get(STATUS + "disconnect/?tenant=nobody&device=x").status_code == 404


def test_outbox_list__pending_and_type_filters_seconds_and_links(cluster_state):
    get_store().assign(list(range(conf.SHARDS)), 1)  # one of the three rows gets its offset
    client = staff("view_outboxitem")
    base = "/admin/backplane/outboxitem/"
    assert client.get(base + "?pending=unassigned").context["cl"].result_count == 2
    assert client.get(base + "?pending=waiting").context["cl"].result_count == 3
    assert client.get(base + "?pending=forwarded").context["cl"].result_count == 0
    assert client.get(base + "?type=cockpit.t").context["cl"].result_count == 3
    assert client.get(base + "?type=other").context["cl"].result_count == 0
    html = client.get(base).content.decode()
    created = OutboxItem.objects.first().created_at
    assert created.strftime("%Y-%m-%d %H:%M:%S") in html
    stream = OutboxItem.objects.first().stream
    assert f'href="{base}?stream=' in html  # each row links to its stream's items
    assert client.get(base + "?stream=" + stream).context["cl"].result_count == 3
    assert client.get(base + "?stream=t:nothing").context["cl"].result_count == 0


def test_outbox_list__never_counts_the_whole_outbox(cluster_state, monkeypatch):
    monkeypatch.setattr(bp_admin, "OUTBOX_COUNT_CAP", 2)
    client = staff("view_outboxitem")
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/backplane/outboxitem/")
    assert page.context["cl"].result_count == 3  # capped: counted up to the cap + 1
    counts = [q["sql"] for q in queries if "COUNT(" in q["sql"].upper() and OUTBOX in q["sql"]]
    assert counts and all("LIMIT" in sql.upper() for sql in counts), counts
    assert Edge.objects.count() == 2
