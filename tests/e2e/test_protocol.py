"""docs/protocol.md on the wire, where it takes daphne: the handshake's status codes and
headers, the operator session's Origin check, 503 when the edge cannot check a credential,
WebSocket pings, and frames as daphne passes them (binary, over 64 KiB in bytes).

Everything else of "Connecting" and "Frames" — each refusal, hello, ping, unknown types,
malformed frames, the inbound rate, resume — runs in process in tests/unit/protocol/.
The peer here is the stock ``websockets`` client (``harness.peer.Peer``).
"""

from __future__ import annotations

import json

import pytest

from harness import waits
from harness.cluster import Cluster
from harness.data import make_tenant, make_token, operator_session, orm, publish
from harness.peer import OPERATOR_ORIGIN, PROTOCOL, Peer, b64url, refused_status
from harness.procs import PYTHON, Proc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["cluster", "serve"])
def module_cluster(module_env, tmp_path_factory, request):  # type: ignore[no-untyped-def]
    """The same handshake checks against both deployments (issue 2's "done when"):

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
            port = waits.free_port()
            env = {**module_env, "REDIS_URL": "", "EDGE_ID": "e2e-proto-serve",
                   "BACKPLANE_ALLOWED_ORIGINS": OPERATOR_ORIGIN}
            proc = Proc("e2e-proto-serve", [PYTHON, "manage.py", "serve", "--port", str(port)], env, cluster.log_dir)
            cluster.edges += [proc, proc]  # one process stands for "both edges"
            cluster.ports += [port, port]
            waits.wait_port(port, timeout=30)
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
    dead = f"postgres://postgres@127.0.0.1:{waits.free_port()}/tyrum_nowhere"
    own_cluster.start_edges(["e2e-proto-nodb"], DATABASE_URL=dead)
    _, token = await _tenant_and_token()
    url = own_cluster.urls[0]
    assert await refused_status(url, token=token) == 503
    assert await refused_status(url, token=token, auth="subprotocol") == 503
    # A credential that is refused before any database look-up is still a 403.
    assert await refused_status(f"{url}?token=x", token=token) == 403
    assert await refused_status(url, token=token, subprotocols=[]) == 403


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


# --- frames as daphne passes them -------------------------------------------------------


async def test_frames__binary_closes_4400_and_over_64_kib_in_bytes_closes_4009(cluster, peers) -> None:
    _, token = await _tenant_and_token()
    binary = await peers(cluster.urls[0], token)
    await binary.send(b'{"type": "ping"}')
    assert await binary.closed() == 4400
    large = await peers(cluster.urls[1], token)
    limit = 64 * 1024
    body = json.dumps({"type": "ping", "pad": ""})
    over = body.replace('""', '"' + "é" * ((limit - len(body)) // 2 + 1) + '"')  # over in bytes, not chars
    assert len(over) <= limit < len(over.encode())
    await large.send(over)
    assert await large.closed() == 4009
