"""The admin as an attacker and a careless operator would use it (issue 13, point 3).

A staff user without ``backplane.view_payload`` cannot read payloads through changelist
lookups or searches; what the backplane keeps itself (outbox, streams, edges, connections,
leases, the token audit) cannot be added, changed or deleted, even by a superuser; a token's
tenant, device, role, hash, expiry and revocation are fixed, and revoking is a confirmed,
audited action that tells the edges (4008) and is never undone.

Each test was run against the admin before this change (``git show a40a78f:backplane/admin.py``)
and failed there.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from backplane import outbox, tokens
from backplane.models import AccessToken, Connection, Edge, OutboxItem, RelayLease, Stream, TokenAudit

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

VIEW_ALL = [
    "view_outboxitem",
    "view_stream",
    "view_edge",
    "view_connection",
    "view_relaylease",
    "view_accesstoken",
    "view_tenant",
    "view_tokenaudit",
]


def staff_client(name: str, *codenames: str) -> Client:
    user = get_user_model().objects.create_user(name, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="backplane", codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def superuser_client() -> Client:
    user = get_user_model().objects.create_superuser("root", email="")
    client = Client()
    client.force_login(user)
    return client


def result_count(response) -> int:
    return response.context["cl"].result_count


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


@pytest.fixture
def pins(tenant):
    """Two events whose payload holds a secret-ish value, and a directed command."""
    # "room" (not a secret-looking key, unlike "pin", which redaction hides before it is stored).
    outbox.publish(tenant, "door.opened", {"room": "P8123"}, event_id="e-1")
    outbox.publish(tenant, "door.closed", {"note": "nothing to see"}, event_id="e-2")
    outbox.publish_command(tenant.id, "edge-1", "disconnect", {"token_id": "t", "code": 4008})


# --- payloads -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lookup",
    [
        "payload__room__startswith=P8",
        "payload__room__startswith=P9",
        "payload__room=P8123",
        "payload__has_key=room",
        "payload__contains=%7B%22room%22%3A%22P8123%22%7D",
        "payload__isnull=false",
    ],
)
def test_outbox_admin__payload_lookup_refused_without_view_payload(pins, lookup):
    viewer = staff_client("viewer", *VIEW_ALL)

    assert viewer.get("/admin/backplane/outboxitem/").status_code == 200  # the list itself is served
    response = viewer.get(f"/admin/backplane/outboxitem/?{lookup}")

    assert response.status_code == 400


def test_outbox_admin__payload_lookup_allowed_with_view_payload(pins):
    # Chosen: a user who may read payloads in the change view may also filter on them.
    reader = staff_client("reader", *VIEW_ALL, "view_payload")

    hit = reader.get("/admin/backplane/outboxitem/?payload__room__startswith=P8")
    miss = reader.get("/admin/backplane/outboxitem/?payload__room__startswith=P9")

    assert (hit.status_code, miss.status_code) == (200, 200)
    assert (result_count(hit), result_count(miss)) == (1, 0)


def test_tenant_admin__payload_lookup_through_a_relation_refused(pins):
    for client in (staff_client("viewer", *VIEW_ALL), staff_client("reader", *VIEW_ALL, "view_payload")):
        response = client.get("/admin/backplane/tenant/?outboxitem__payload__room__startswith=P8")

        assert response.status_code == 400


def test_outbox_admin__search_does_not_reach_the_payload(pins):
    for client in (staff_client("viewer", *VIEW_ALL), staff_client("reader", *VIEW_ALL, "view_payload")):
        assert result_count(client.get("/admin/backplane/outboxitem/?q=door.opened")) == 1  # search works
        assert result_count(client.get("/admin/backplane/outboxitem/?q=P8123")) == 0
        assert result_count(client.get("/admin/backplane/outboxitem/?q=P8")) == 0


def test_outbox_admin__change_view_hides_the_payload_without_view_payload(pins):
    row = OutboxItem.objects.get(event_id="e-1")
    url = f"/admin/backplane/outboxitem/{row.pk}/change/"

    hidden = staff_client("viewer", *VIEW_ALL).get(url)
    shown = staff_client("reader", *VIEW_ALL, "view_payload").get(url)

    assert (hidden.status_code, shown.status_code) == (200, 200)
    assert b"P8123" not in hidden.content
    assert b"P8123" in shown.content


# --- what the backplane keeps itself: read-only, not deletable ------------------------------


@pytest.fixture
def state(tenant, pins):
    """One row of each table the backplane keeps itself."""
    edge = Edge.objects.create(edge_id="edge-1")
    token, _ = tokens.create_token(tenant, "dev-1", "client")
    Connection.objects.create(
        connection_id="c-1",
        tenant=tenant,
        device_id="dev-1",
        role="client",
        token=token,
        edge=edge,
        channel_name="x",
        expires_at=timezone.now() + timedelta(minutes=5),
    )
    Stream.objects.create(key="s-1", tenant=tenant, audience="tenant", epoch="abcd1234", last_offset=7)
    RelayLease.objects.create(shard=0, holder="relay-1")
    return {
        "outboxitem": OutboxItem.objects.get(event_id="e-1").pk,
        "unforwarded command": OutboxItem.objects.get(kind="command").pk,
        "stream": "s-1",
        "edge": "edge-1",
        "connection": "c-1",
        "relaylease": 0,
        "tokenaudit": TokenAudit.objects.get().pk,
    }


def counts() -> tuple[int, ...]:
    return (
        OutboxItem.objects.count(),
        Stream.objects.count(),
        Edge.objects.count(),
        Connection.objects.count(),
        RelayLease.objects.count(),
        TokenAudit.objects.count(),
    )


@pytest.mark.parametrize(
    "what", ["outboxitem", "unforwarded command", "stream", "edge", "connection", "relaylease", "tokenaudit"]
)
def test_admin__backplane_state_cannot_be_deleted_even_by_a_superuser(state, what):
    admin = superuser_client()
    model = what.split()[-1].replace("command", "outboxitem")
    pk = state[what]
    before = counts()

    view = admin.get(f"/admin/backplane/{model}/{pk}/delete/")
    post = admin.post(f"/admin/backplane/{model}/{pk}/delete/", {"post": "yes"})
    bulk = admin.post(
        f"/admin/backplane/{model}/", {"action": "delete_selected", "_selected_action": [pk], "post": "yes"}
    )

    assert (view.status_code, post.status_code) == (403, 403)
    assert bulk.status_code in (200, 302)  # "no action selected": the action is not offered
    assert counts() == before


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        ("stream", "last_offset", "0"),
        ("stream", "epoch", "00000000"),
        ("edge", "host", "evil"),
        ("connection", "device_id", "someone-else"),
        ("relaylease", "holder", "me"),
        ("outboxitem", "stream_offset", "1"),
    ],
)
def test_admin__backplane_state_cannot_be_edited_even_by_a_superuser(state, model, field, value):
    admin = superuser_client()
    pk = state[model]
    url = f"/admin/backplane/{model}/{pk}/change/"
    row = admin.get(url)
    before = getattr(type(row.context["original"]).objects.get(pk=pk), field)

    response = admin.post(url, {field: value})

    assert row.status_code == 200  # still shown, read-only
    assert response.status_code == 403
    assert getattr(type(row.context["original"]).objects.get(pk=pk), field) == before
    assert admin.get(f"/admin/backplane/{model}/add/").status_code == 403


# --- tokens ---------------------------------------------------------------------------------


@pytest.fixture
def token_row(tenant):
    row, _ = tokens.create_token(tenant, "dev-1", "client", label="old label")
    return row


def token_form(row: AccessToken, **changes: str) -> dict[str, str]:
    data = {
        "tenant": str(row.tenant_id),
        "device_id": row.device_id,
        "role": row.role,
        "label": row.label,
        "expires_at_0": "",
        "expires_at_1": "",
        "revoked_at_0": "",
        "revoked_at_1": "",
        "token_hash": "0" * 64,
    }
    data.update(changes)
    return data


def test_token_admin__only_the_label_changes(tenant_factory, token_row):
    other = tenant_factory("other")
    tokens.revoke_token(token_row)
    before = AccessToken.objects.get(pk=token_row.pk)
    admin = superuser_client()

    response = admin.post(
        f"/admin/backplane/accesstoken/{token_row.pk}/change/",
        token_form(before, tenant=str(other.id), role="operator", device_id="dev-9", label="new label"),
    )

    assert response.status_code == 302, response.content[-2000:]
    after = AccessToken.objects.get(pk=token_row.pk)
    assert after.label == "new label"
    assert (after.tenant_id, after.device_id, after.role, after.token_hash, after.expires_at, after.revoked_at) == (
        before.tenant_id,
        before.device_id,
        before.role,
        before.token_hash,
        before.expires_at,
        before.revoked_at,
    )
    assert after.revoked_at is not None  # not un-revoked


def test_token_admin__hash_not_shown_nor_searchable(token_row):
    admin = superuser_client()

    page = admin.get(f"/admin/backplane/accesstoken/{token_row.pk}/change/")
    lookup = admin.get(f"/admin/backplane/accesstoken/?token_hash__startswith={token_row.token_hash[:2]}")

    assert page.status_code == 200 and token_row.token_hash.encode() not in page.content
    assert lookup.status_code == 400


def test_tenant_admin__with_tokens_cannot_be_deleted(token_row):
    # Its tokens would go with it and their sockets stay open: deactivate it instead (4008).
    admin = superuser_client()
    url = f"/admin/backplane/tenant/{token_row.tenant_id}/delete/"

    assert admin.post(url, {"post": "yes"}).status_code == 403
    assert AccessToken.objects.filter(pk=token_row.pk).exists()


def test_token_admin__no_add_no_delete(token_row):
    admin = superuser_client()

    assert admin.get("/admin/backplane/accesstoken/add/").status_code == 403
    assert admin.post(f"/admin/backplane/accesstoken/{token_row.pk}/delete/", {"post": "yes"}).status_code == 403
    admin.post(
        "/admin/backplane/accesstoken/",
        {"action": "delete_selected", "_selected_action": [token_row.pk], "post": "yes"},
    )
    assert AccessToken.objects.filter(pk=token_row.pk).exists()


def test_token_admin__revoke_action_confirms_then_revokes_audits_and_tells_the_edges(tenant, token_row):
    Edge.objects.create(edge_id="edge-1")
    Connection.objects.create(
        connection_id="c-1",
        tenant=tenant,
        device_id="dev-1",
        role="client",
        token=token_row,
        edge_id="edge-1",
        channel_name="x",
        expires_at=timezone.now() + timedelta(minutes=5),
    )
    bystander, _ = tokens.create_token(tenant, "dev-2", "client")
    admin = superuser_client()
    selected = {"action": "revoke_selected", "_selected_action": [str(token_row.pk)]}

    confirm = admin.post("/admin/backplane/accesstoken/", {**selected, "index": "0"})

    assert confirm.status_code == 200
    assert b"cannot be undone" in confirm.content and str(token_row.pk).encode() in confirm.content
    assert AccessToken.objects.get(pk=token_row.pk).revoked_at is None  # not before the confirmation

    done = admin.post("/admin/backplane/accesstoken/", {**selected, "post": "yes"})

    assert done.status_code == 302
    assert AccessToken.objects.get(pk=token_row.pk).revoked_at is not None
    assert AccessToken.objects.get(pk=bystander.pk).revoked_at is None
    audit = TokenAudit.objects.get(action="revoke")
    assert (audit.token_id, audit.actor) == (token_row.pk, "root")
    command = OutboxItem.objects.get(kind="command")
    assert (command.type, command.payload["token_id"], command.payload["code"]) == (
        "bp.disconnect",
        str(token_row.pk),
        4008,
    )


def test_token_admin__revoke_action_needs_change_permission(token_row):
    viewer = staff_client("viewer", *VIEW_ALL)

    viewer.post(
        "/admin/backplane/accesstoken/",
        {"action": "revoke_selected", "_selected_action": [str(token_row.pk)], "post": "yes"},
    )

    assert AccessToken.objects.get(pk=token_row.pk).revoked_at is None
