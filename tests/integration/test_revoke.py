"""Token revocation: ``revoked_at`` plus one durable ``disconnect`` command per edge holding a socket."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from backplane import auth, exceptions, streams, tokens
from backplane.models import AccessToken, Connection, Edge, OutboxItem

from .helpers import TIMEOUT, join, orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def open_socket(token: AccessToken, edge_id: str, n: int) -> None:
    edge, _ = Edge.objects.get_or_create(edge_id=edge_id)
    Connection.objects.create(
        connection_id=f"{edge_id}-{n}", tenant_id=token.tenant_id, device_id=token.device_id, role=token.role,
        token=token, edge=edge, channel_name=f"chan-{n}", expires_at=timezone.now() + timedelta(seconds=30),
    )


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory("acme")


def test_revoke_token__one_command_per_edge_holding_a_socket(tenant):
    row, token = tokens.create_token(tenant, "dev-1", "client")
    other, _ = tokens.create_token(tenant, "dev-2", "client")
    open_socket(row, "edge-a", 1)
    open_socket(row, "edge-a", 2)
    open_socket(row, "edge-b", 3)
    open_socket(other, "edge-c", 4)

    revoked, edges = tokens.revoke_token(token)

    assert revoked.id == row.id
    assert edges == ["edge-a", "edge-b"]
    row.refresh_from_db()
    assert row.revoked_at is not None
    assert AccessToken.objects.get(pk=other.pk).revoked_at is None
    commands = OutboxItem.objects.order_by("stream")
    assert [(c.kind, c.stream, c.type, c.tenant_id) for c in commands] == [
        ("command", streams.edge_stream("edge-a"), "bp.disconnect", tenant.id),
        ("command", streams.edge_stream("edge-b"), "bp.disconnect", tenant.id),
    ]
    assert all(
        c.payload == {"command": "disconnect", "tenant_id": str(tenant.id), "token_id": str(row.id), "code": 4008}
        for c in commands
    )
    assert len({c.event_id for c in commands}) == 2


def test_revoke_token__by_id_and_without_sockets_writes_no_command(tenant):
    row, token = tokens.create_token(tenant, "dev-1", "node")

    revoked, edges = tokens.revoke_token(str(row.id))

    assert (revoked.id, edges) == (row.id, [])
    assert AccessToken.objects.get(pk=row.pk).revoked_at is not None
    assert not OutboxItem.objects.exists()
    with pytest.raises(auth.AuthRefused, match="revoked"):
        auth.authenticate({"headers": [(b"authorization", f"Bearer {token}".encode())]})


def test_revoke_token__again_keeps_first_revocation_time(tenant):
    row, token = tokens.create_token(tenant, "dev-1", "client")
    tokens.revoke_token(token)
    first = AccessToken.objects.get(pk=row.pk).revoked_at

    tokens.revoke_token(token)

    assert AccessToken.objects.get(pk=row.pk).revoked_at == first


def test_revoke_token__unknown_token_raises(tenant):
    with pytest.raises(exceptions.TokenError):
        tokens.revoke_token("tyr_not-a-token")
    assert not OutboxItem.objects.exists()


async def test_revoke_token__relay_carries_command_to_the_edge_group(tenant, make_relay, layer):
    row, token = await orm(tokens.create_token, tenant, "dev-1", "client")
    await orm(open_socket, row, "edge-a", 1)
    channel = await join(layer, streams.edge_stream("edge-a"))

    await orm(tokens.revoke_token, token)
    assert await make_relay().cycle() == (1, 1)

    message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
    assert message["type"] == "bp.command"
    assert json.loads(message["body"]) == {
        "command": "disconnect", "tenant_id": str(tenant.id), "token_id": str(row.id), "code": 4008,
    }
