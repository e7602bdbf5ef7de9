"""docs/protocol.md, "Connecting" and the hello frame, in process: the upgrade is accepted
with exactly ``tyrum-v1``, credentials are taken in their order of preference, and every
refusal happens before the socket opens (daphne turns a close before accept into HTTP 403;
tests/e2e/test_protocol.py shows the statuses and headers on the wire)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from harness.data import make_tenant, make_token, orm, publish, publish_many
from harness.inprocess import AsgiPeer, InProcessEdge
from harness.peer import PROTOCOL, b64url


async def tenant_and_token(device: str = "dev-1", role: str = "client") -> tuple[Any, str]:
    tenant = await orm(make_tenant)
    return tenant, await orm(make_token, tenant, device, role)


# --- hello ------------------------------------------------------------------------------


async def test_hello__names_protocol_ids_and_stream_heads(edge: InProcessEdge) -> None:
    tenant, token = await tenant_and_token(device="dev-h", role="node")
    first = await edge.connect(token)
    hello = first.hello
    assert set(hello) == {"type", "protocol", "connection_id", "edge_id", "streams"}
    assert hello["protocol"] == PROTOCOL
    assert hello["edge_id"] == edge.edge_id
    assert isinstance(hello["connection_id"], str) and hello["connection_id"]
    assert set(hello["streams"]) == {"tenant", "role", "device"}
    for head in hello["streams"].values():  # never an event yet: offset 0, an epoch all the same
        assert set(head) == {"epoch", "offset"}
        assert isinstance(head["epoch"], str) and head["epoch"]
        assert head["offset"] == 0

    await orm(publish_many, tenant, [{"type": "a.b", "payload": {}}, {"type": "a.b", "payload": {}},
                                     {"type": "a.b", "payload": {}, "device": "dev-h"}])
    assert await edge.forward() == 3
    second = await edge.connect(token)
    assert second.hello["connection_id"] != hello["connection_id"]
    streams = second.hello["streams"]
    assert {name: s["offset"] for name, s in streams.items()} == {"tenant": 2, "role": 0, "device": 1}
    assert {name: s["epoch"] for name, s in streams.items()} == {n: s["epoch"] for n, s in hello["streams"].items()}


# --- the subprotocol --------------------------------------------------------------------


async def test_subprotocol__accepts_with_exactly_tyrum_v1(edge: InProcessEdge) -> None:
    _, token = await tenant_and_token()
    peer = await edge.connect(token, subprotocols=["tyrum-v0", PROTOCOL, "chat"])
    assert peer.subprotocol == PROTOCOL
    assert peer.hello["protocol"] == PROTOCOL


@pytest.mark.parametrize("offered", [[], ["tyrum-v2"], ["TYRUM-V1"], ["auth-only"]])
async def test_subprotocol__not_offered_is_refused_403(edge: InProcessEdge, offered: list[str]) -> None:
    _, token = await tenant_and_token()
    if offered == ["auth-only"]:
        offered = [f"tyrum-auth.{b64url(token)}"]
    assert await edge.refused_status(token, subprotocols=offered) == 403


# --- credentials ------------------------------------------------------------------------


async def test_auth__bearer_header_connects_as_its_device(edge: InProcessEdge) -> None:
    tenant, token = await tenant_and_token(device="dev-bearer")
    peer = await edge.connect(token)
    await peer.ping()
    await orm(publish, tenant, "run.updated", {"n": 1}, device="dev-bearer")
    await orm(publish, tenant, "run.updated", {"n": 2}, device="dev-other")
    await orm(publish, tenant, "run.updated", {"n": 3}, role="client")
    await edge.forward()
    await peer.until_events(2)
    assert sorted((e["stream"], e["event"]["payload"]["n"]) for e in peer.events) == [("device", 1), ("role", 3)]
    assert await peer.quiet(0.2) == []


async def test_auth__subprotocol_token_accepted_and_never_echoed(edge: InProcessEdge) -> None:
    tenant, token = await tenant_and_token(device="dev-browser")
    encoded = b64url(token)
    assert "=" not in encoded
    peer = await edge.connect(token, auth="subprotocol")
    assert peer.subprotocol == PROTOCOL
    assert encoded not in json.dumps(peer.hello) and token not in json.dumps(peer.hello)
    await peer.ping()
    await orm(publish, tenant, "run.updated", {"n": 1}, device="dev-browser")
    await edge.forward()
    assert (await peer.until_events(1))[0]["stream"] == "device"


async def test_auth__bearer_preferred_over_subprotocol_token(edge: InProcessEdge) -> None:
    tenant = await orm(make_tenant)
    header_token = await orm(make_token, tenant, "dev-header")
    proto_token = await orm(make_token, tenant, "dev-proto")
    peer = await edge.connect(header_token, subprotocols=[PROTOCOL, f"tyrum-auth.{b64url(proto_token)}"])
    await peer.ping()
    await orm(publish, tenant, "run.updated", {"to": "proto"}, device="dev-proto")
    await orm(publish, tenant, "run.updated", {"to": "header"}, device="dev-header")
    await edge.forward()
    events = await peer.until_events(1)
    assert [e["event"]["payload"]["to"] for e in events] == ["header"]
    assert await peer.quiet(0.2) == []


@pytest.mark.parametrize("bad", ["tyrum-auth.%%%", "tyrum-auth.A", "tyrum-auth.____"])
async def test_auth__malformed_subprotocol_token_is_refused_403(edge: InProcessEdge, bad: str) -> None:
    assert await edge.refused_status(subprotocols=[PROTOCOL, bad]) == 403


@pytest.mark.parametrize("query", [
    "token=x", "Access_Token=x", "jwt=x", "AUTH=x", "authorization=x", "api_key=x", "token", "a=1&TOKEN=",
    "%74oken=x",  # percent-encoded name
])
async def test_auth__credential_in_url_is_refused_even_with_valid_bearer(edge: InProcessEdge, query: str) -> None:
    _, token = await tenant_and_token()
    assert await edge.refused_status(token, path=f"/ws?{query}") == 403
    assert await edge.refused_status(token, path=f"/ws?{query}", auth="subprotocol") == 403


async def test_auth__url_without_credential_parameter_is_accepted(edge: InProcessEdge) -> None:
    _, token = await tenant_and_token()
    peer = await edge.connect(token, path="/ws?client=web&v=2&tokenizer=x")
    assert peer.hello["type"] == "hello"


async def test_auth__unusable_credentials_are_refused_403(edge: InProcessEdge) -> None:
    from backplane.models import Tenant
    from backplane.tokens import revoke_token

    tenant, good = await tenant_and_token()
    revoked = await orm(make_token, tenant, "dev-2")
    await orm(revoke_token, revoked)
    expired = await orm(make_token, tenant, "dev-3", expires_at=timezone.now() - timedelta(seconds=1))
    inactive_tenant = await orm(make_tenant)
    inactive = await orm(make_token, inactive_tenant, "dev-4")
    await orm(Tenant.objects.filter(pk=inactive_tenant.pk).update, is_active=False)
    assert await edge.refused_status() == 403  # no credential at all
    assert await edge.refused_status("tyr_" + "x" * 43) == 403  # unknown
    assert await edge.refused_status("tyr_" + "x" * 43, auth="subprotocol") == 403
    for bad in (revoked, expired, inactive):
        assert await edge.refused_status(bad) == 403
        assert await edge.refused_status(bad, auth="subprotocol") == 403
    assert await edge.refused_status(headers={"Authorization": f"Basic {good}"}) == 403
    assert await edge.refused_status(headers={"Authorization": "Bearer "}) == 403
    peer = await AsgiPeer.open(good)  # the same request with a good token is accepted
    await peer.close()
