"""PROTOCOL.md on the wire, "Connecting" and "Frames": two daphne edges and one relay.

The peer here is the stock ``websockets`` client and this file's knowledge of PROTOCOL.md,
nothing of the project's own client.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import support
from django.utils import timezone

from e2e.conftest import (
    OPERATOR_ORIGIN,
    PROTOCOL,
    Cluster,
    Peer,
    b64url,
    make_tenant,
    make_token,
    operator_session,
    orm,
    publish,
    publish_many,
    refused_status,
    stream_key,
    wait_assigned,
)

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module", params=["cluster", "serve"])
def module_cluster(module_env, tmp_path_factory, request):  # type: ignore[no-untyped-def]
    """The same protocol suite against both deployments (issue 2's "done when"):

    - ``cluster``: two daphne edges that accept operator sessions from OPERATOR_ORIGIN, and
      one relay, over PostgreSQL and Redis;
    - ``serve``: the single-process gateway (edge + relay + compaction) with the in-process
      channel layer (REDIS_URL empty), on the same test database so the test can seed it.
    """
    cluster = Cluster(log_dir=tmp_path_factory.mktemp("logs"), env=module_env)
    try:
        if request.param == "cluster":
            cluster.start_edges(["e2e-proto-a", "e2e-proto-b"], BACKPLANE_ALLOWED_ORIGINS=OPERATOR_ORIGIN)
            cluster.start_relay("e2e-proto-relay")
        else:
            port = support.free_port()
            env = {**module_env, "REDIS_URL": "", "EDGE_ID": "e2e-proto-serve",
                   "BACKPLANE_ALLOWED_ORIGINS": OPERATOR_ORIGIN}
            proc = support.Proc("e2e-proto-serve", [support.PYTHON, "manage.py", "serve", "--port", str(port)],
                                env, cluster.log_dir)
            cluster.edges += [proc, proc]  # one process stands for "both edges"
            cluster.ports += [port, port]
            support.wait_port(port, timeout=30)
        yield cluster
    finally:
        cluster.stop()


async def _tenant_and_token(device: str = "dev-1", role: str = "client"):  # type: ignore[no-untyped-def]
    tenant = await orm(make_tenant)
    return tenant, await orm(make_token, tenant, device, role)


# --- connecting ---------------------------------------------------------------------------


async def test_subprotocol__accepts_with_exactly_tyrum_v1(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    for url in cluster.urls:
        peer = await peers(url, token, subprotocols=["tyrum-v0", PROTOCOL, "chat"])
        assert peer.ws.subprotocol == PROTOCOL
        assert peer.ws.response.headers.get_all("Sec-WebSocket-Protocol") == [PROTOCOL]
        assert peer.hello["protocol"] == PROTOCOL


async def test_subprotocol__not_offered_is_refused_403(cluster) -> None:
    _, token = await _tenant_and_token()
    for offered in ([], ["tyrum-v2"], ["TYRUM-V1"], [f"tyrum-auth.{b64url(token)}"]):
        assert await refused_status(cluster.urls[0], token=token, subprotocols=offered) == 403, offered


async def test_auth__bearer_header_connects_as_its_device(cluster, peers) -> None:
    tenant, token = await _tenant_and_token(device="dev-bearer")
    peer = await peers(cluster.urls[1], token)
    await orm(publish, tenant, "run.updated", {"n": 1}, device="dev-bearer")
    await orm(publish, tenant, "run.updated", {"n": 2}, device="dev-other")
    await orm(publish, tenant, "run.updated", {"n": 3}, role="client")
    await peer.until_events(2)
    assert sorted((e["stream"], e["event"]["payload"]["n"]) for e in peer.events) == [("device", 1), ("role", 3)]
    assert await peer.quiet(0.8) == []


async def test_auth__subprotocol_token_accepted_and_never_echoed(cluster, peers) -> None:
    tenant, token = await _tenant_and_token(device="dev-browser")
    encoded = b64url(token)
    assert "=" not in encoded
    peer = await peers(cluster.urls[0], token, auth="subprotocol")
    assert peer.ws.subprotocol == PROTOCOL
    assert peer.ws.response.headers.get_all("Sec-WebSocket-Protocol") == [PROTOCOL]
    for name, value in peer.ws.response.headers.raw_items():
        assert encoded not in value and token not in value, name
    await orm(publish, tenant, "run.updated", {"n": 1}, device="dev-browser")
    assert (await peer.until_events(1))[0]["stream"] == "device"


async def test_auth__bearer_preferred_over_subprotocol_token(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    header_token = await orm(make_token, tenant, "dev-header")
    proto_token = await orm(make_token, tenant, "dev-proto")
    peer = await peers(cluster.urls[0], header_token, headers={},
                       subprotocols=[PROTOCOL, f"tyrum-auth.{b64url(proto_token)}"])
    await orm(publish, tenant, "run.updated", {"to": "proto"}, device="dev-proto")
    await orm(publish, tenant, "run.updated", {"to": "header"}, device="dev-header")
    events = await peer.until_events(1)
    assert [e["event"]["payload"]["to"] for e in events] == ["header"]
    assert await peer.quiet(0.8) == []


async def test_auth__malformed_subprotocol_token_is_refused_403(cluster) -> None:
    await _tenant_and_token()
    for bad in ("tyrum-auth.%%%", "tyrum-auth.A", "tyrum-auth.____"):
        assert await refused_status(cluster.urls[0], subprotocols=[PROTOCOL, bad]) == 403, bad


@pytest.mark.parametrize("query", [
    "token=x", "Access_Token=x", "jwt=x", "AUTH=x", "authorization=x", "api_key=x", "token", "a=1&TOKEN=",
    "%74oken=x",  # percent-encoded name
])
async def test_auth__credential_in_url_is_refused_even_with_valid_bearer(cluster, query) -> None:
    _, token = await _tenant_and_token()
    for url in cluster.urls:
        assert await refused_status(f"{url}?{query}", token=token) == 403
        assert await refused_status(f"{url}?{query}", token=token, auth="subprotocol") == 403


async def test_auth__url_without_credential_parameter_is_accepted(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    peer = await peers(f"{cluster.urls[0]}?client=web&v=2&tokenizer=x", token)
    assert peer.hello["type"] == "hello"


async def test_auth__unusable_credentials_are_refused_403(cluster) -> None:
    from backplane.auth import revoke_token
    from backplane.models import Tenant

    tenant, good = await _tenant_and_token()
    revoked = await orm(make_token, tenant, "dev-2")
    await orm(revoke_token, revoked)
    expired = await orm(make_token, tenant, "dev-3", expires_at=timezone.now() - timedelta(seconds=1))
    inactive_tenant = await orm(make_tenant)
    inactive = await orm(make_token, inactive_tenant, "dev-4")
    await orm(Tenant.objects.filter(pk=inactive_tenant.pk).update, is_active=False)
    url = cluster.urls[1]
    assert await refused_status(url) == 403  # no credential at all
    assert await refused_status(url, token="tyr_" + "x" * 43) == 403  # unknown
    assert await refused_status(url, token="tyr_" + "x" * 43, auth="subprotocol") == 403
    for bad in (revoked, expired, inactive):
        assert await refused_status(url, token=bad) == 403
        assert await refused_status(url, token=bad, auth="subprotocol") == 403
    assert await refused_status(url, headers={"Authorization": f"Basic {good}"}) == 403
    assert await refused_status(url, headers={"Authorization": "Bearer "}) == 403
    peer = await Peer.open(url, good)  # the same request with a good token is accepted
    await peer.close()


async def test_auth__operator_session_cookie_needs_an_allowed_origin(cluster, peers) -> None:
    tenant = await orm(make_tenant)
    cookie = await orm(operator_session, tenant)
    url = cluster.urls[0]
    assert await refused_status(url, headers={"Cookie": cookie}) == 403
    assert await refused_status(url, headers={"Cookie": cookie, "Origin": "https://evil.example"}) == 403
    assert await refused_status(url, headers={"Cookie": "sessionid=nope", "Origin": OPERATOR_ORIGIN}) == 403
    peer = await peers(url, headers={"Cookie": cookie, "Origin": OPERATOR_ORIGIN})
    assert peer.ws.subprotocol == PROTOCOL
    await orm(publish, tenant, "run.updated", {"for": "operators"}, role="operator")
    await orm(publish, tenant, "run.updated", {"for": "clients"}, role="client")
    events = await peer.until_events(1)
    assert [(e["stream"], e["event"]["payload"]["for"]) for e in events] == [("role", "operators")]
    # A token comes first: with a client's Bearer token as well, the socket is that client's.
    client = await peers(url, await orm(make_token, tenant, "dev-1", "client"),
                         headers={"Cookie": cookie, "Origin": OPERATOR_ORIGIN})
    await orm(publish, tenant, "run.updated", {"for": "clients"}, role="client")
    assert [e["event"]["payload"]["for"] for e in await client.until_events(1)] == ["clients"]


async def test_edge__store_unreachable_is_refused_503(own_cluster) -> None:
    """The edge cannot check a credential (its database is down): HTTP 503, no socket."""
    dead = f"postgres://postgres@127.0.0.1:{support.free_port()}/tyrum_nowhere"
    own_cluster.start_edges(["e2e-proto-nodb"], DATABASE_URL=dead)
    _, token = await _tenant_and_token()
    url = own_cluster.urls[0]
    assert await refused_status(url, token=token) == 503
    assert await refused_status(url, token=token, auth="subprotocol") == 503
    # A credential that is refused before any database look-up is still a 403.
    assert await refused_status(f"{url}?token=x", token=token) == 403
    assert await refused_status(url, token=token, subprotocols=[]) == 403


# --- hello ----------------------------------------------------------------------------------


async def test_hello__names_protocol_ids_and_stream_heads(cluster, peers) -> None:
    tenant, token = await _tenant_and_token(device="dev-h", role="node")
    first = await peers(cluster.urls[0], token)
    hello = first.hello
    assert set(hello) >= {"type", "protocol", "connection_id", "edge_id", "streams"}
    assert hello["protocol"] == PROTOCOL
    assert hello["edge_id"] == cluster.edge_ids[0]
    assert isinstance(hello["connection_id"], str) and hello["connection_id"]
    assert set(hello["streams"]) == {"tenant", "role", "device"}
    for head in hello["streams"].values():  # never an event yet: offset 0, an epoch all the same
        assert set(head) == {"epoch", "offset"}
        assert isinstance(head["epoch"], str) and head["epoch"]
        assert head["offset"] == 0

    await orm(publish_many, tenant, [{"type": "a.b", "payload": {}}, {"type": "a.b", "payload": {}},
                                     {"type": "a.b", "payload": {}, "device": "dev-h"}])
    await wait_assigned(stream_key(tenant, "tenant"), 2)
    await wait_assigned(stream_key(tenant, "device", device="dev-h"), 1)
    second = await peers(cluster.urls[1], token)
    assert second.hello["edge_id"] == cluster.edge_ids[1]
    assert second.hello["connection_id"] != hello["connection_id"]
    streams = second.hello["streams"]
    assert {name: s["offset"] for name, s in streams.items()} == {"tenant": 2, "role": 0, "device": 1}
    assert {name: s["epoch"] for name, s in streams.items()} == {n: s["epoch"] for n, s in hello["streams"].items()}


# --- frames ---------------------------------------------------------------------------------


async def test_ping__is_answered_with_pong(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    peer = await peers(cluster.urls[0], token)
    for _ in range(3):
        await peer.send({"type": "ping"})
        assert await peer.recv() == {"type": "pong"}


async def test_unknown_type__is_an_error_and_the_socket_stays_open(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    peer = await peers(cluster.urls[1], token)
    for kind in ("subscribe", "hello", "event", "PING"):
        await peer.send({"type": kind, "x": 1})
        frame = await peer.recv()
        assert frame["type"] == "error" and frame["code"] == "unknown_type", frame
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}


@pytest.mark.parametrize("frame", [
    "not json", "{\"type\": \"ping\"", "", "[]", "[{\"type\": \"ping\"}]", "\"ping\"", "42", "null", "{}",
    "{\"type\": 5}", "{\"type\": null}", "{\"type\": [\"ping\"]}", b"{\"type\": \"ping\"}",
], ids=lambda f: repr(f)[:24])
async def test_malformed_frame__closes_4400(cluster, peers, frame) -> None:
    _, token = await _tenant_and_token()
    peer = await peers(cluster.urls[0], token)
    await peer.send(frame)
    assert await peer.closed() == 4400


async def test_frame_size__over_64_kib_closes_4009(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    peer = await peers(cluster.urls[1], token)
    limit = 64 * 1024
    body = json.dumps({"type": "ping", "pad": ""})
    at_limit = body.replace('""', '"' + "x" * (limit - len(body)) + '"')
    assert len(at_limit.encode()) == limit
    await peer.send(at_limit)
    assert await peer.recv() == {"type": "pong"}
    over = body.replace('""', '"' + "é" * ((limit - len(body)) // 2 + 1) + '"')  # over in bytes, not chars
    assert len(over) <= limit < len(over.encode())
    await peer.send(over)
    assert await peer.closed() == 4009


async def test_inbound_rate__a_flood_closes_4029(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    calm = await peers(cluster.urls[0], token)
    flood = await peers(cluster.urls[0], token)
    for _ in range(50):  # within the burst of 60: all answered
        await calm.send({"type": "ping"})
    await calm.until(lambda p: p.frames.count({"type": "pong"}) == 50, what="50 pongs")
    for _ in range(200):
        await flood.send({"type": "ping"})
    assert await flood.closed() == 4029
    pongs = flood.frames.count({"type": "pong"})
    assert 50 <= pongs < 200, pongs
    await calm.send({"type": "ping"})  # the other socket of the same token is not affected
    assert await calm.recv() == {"type": "pong"}


async def test_keepalive__the_server_sends_websocket_pings(own_cluster) -> None:
    """Daphne's --ping-interval (20 s by default) is shortened here to see a ping on the wire."""
    from websockets.frames import Opcode

    own_cluster.start_edges(["e2e-proto-ping"], ping_interval=1)
    _, token = await _tenant_and_token()
    peer = await Peer.open(own_cluster.urls[0], token)
    try:
        seen: list[Opcode] = []
        original = peer.ws.protocol.recv_frame

        def spy(frame):  # type: ignore[no-untyped-def]
            seen.append(frame.opcode)
            return original(frame)

        peer.ws.protocol.recv_frame = spy  # type: ignore[method-assign]
        await peer.quiet(3.5)
        assert Opcode.PING in seen, seen
        await peer.send({"type": "ping"})  # the client answered the pings: still open
        assert await peer.recv() == {"type": "pong"}
    finally:
        await peer.close()


async def test_resume__not_first_frame_is_an_error(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    peer = await peers(cluster.urls[0], token)
    epoch, offset = peer.head("device")
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}
    await peer.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": offset}}})
    assert await peer.recv() == {"type": "error", "code": "resume_not_first"}
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}
