"""Sensitive by default: at DEBUG, no process log holds a token, an upgrade header or a payload."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from harness import procs
from harness.data import make_tenant, make_token, orm, publish, wait_forwarded
from harness.peer import PROTOCOL, Peer, b64url, refused_status

pytestmark = pytest.mark.e2e


def revoke_from_stdin(token: str, env: dict[str, str]) -> str:
    """``manage.py revoke_token -`` with the token on standard input (never on the command line)."""
    out = subprocess.run([procs.PYTHON, "manage.py", "revoke_token", "-"], cwd=procs.ROOT, env=env, input=token,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


async def test_logs__hold_no_token_header_or_payload_at_debug(own_cluster) -> None:
    debug = {"LOG_LEVEL": "DEBUG", "DAPHNE_LOG_LEVEL": "DEBUG", "BACKPLANE_ALLOWED_ORIGINS": "https://ops.example"}
    own_cluster.env = {**own_cluster.env, **debug}
    own_cluster.start_edges(["e2e-logs-a", "e2e-logs-b"])
    own_cluster.start_relay("e2e-logs-relay")
    a, b = own_cluster.urls

    tenant = await orm(make_tenant)
    header_token = await orm(make_token, tenant, "dev-1")
    proto_token = await orm(make_token, tenant, "dev-2")
    url_token = await orm(make_token, tenant, "dev-3")
    unknown_token = "tyr_" + uuid.uuid4().hex + "unknown"
    cookie = f"sessionid=cookie{uuid.uuid4().hex}"
    marker = f"payload-marker-{uuid.uuid4().hex}"
    cli_marker = f"cli-marker-{uuid.uuid4().hex}"
    secrets = {
        "header token": header_token, "subprotocol token": proto_token, "URL token": url_token,
        "unknown token": unknown_token, "cookie": cookie.split("=", 1)[1], "payload": marker, "CLI payload": cli_marker,
        **{f"{name} as base64url": b64url(value) for name, value in
           (("header token", header_token), ("subprotocol token", proto_token), ("URL token", url_token),
            ("unknown token", unknown_token))},
    }

    by_header = await Peer.open(a, header_token, headers={"Cookie": cookie, "Origin": "https://ops.example"})
    by_proto = await Peer.open(b, proto_token, auth="subprotocol")
    try:
        assert by_proto.ws.subprotocol == PROTOCOL
        for url in (a, b):
            assert await refused_status(f"{url}?token={url_token}", token=header_token) == 403
            assert await refused_status(f"{url}?x=1&access_token={url_token}") == 403
            assert await refused_status(url, token=unknown_token) == 403
            assert await refused_status(url, token=unknown_token, auth="subprotocol") == 403
            assert await refused_status(url, headers={"Cookie": cookie, "Origin": "https://ops.example"}) == 403
        await orm(publish, tenant, "note.added", {"note": marker, "nested": {"list": [marker]}})
        await orm(publish, tenant, "note.added", {"note": marker}, device="dev-1")
        cli = await asyncio.to_thread(
            procs.manage, "publish_event", "--tenant", tenant.slug, "--type", "note.added",
            "--payload", f'{{"note": "{cli_marker}"}}', "--device", "dev-2", env=own_cluster.env)
        await by_header.until_events(2)
        await by_proto.until_events(2)
        assert marker in str(by_header.events) and cli_marker in str(by_proto.events)  # it did travel
        await wait_forwarded(tenant)
        # Replay reads payloads from the outbox too.
        resumer = await Peer.open(b, header_token)
        await resumer.send({"type": "resume", "streams": {n: {"epoch": s["epoch"], "offset": 0}
                                                          for n, s in resumer.hello["streams"].items()}})
        await resumer.until(lambda p: p.frames[-1]["type"] == "resumed", what="resumed")
        assert len(resumer.events) == 2
        await resumer.send("this is not json " + marker)  # a malformed frame is not echoed into a log
        assert await resumer.closed() == 4400
        revoke = await asyncio.to_thread(revoke_from_stdin, header_token, own_cluster.env)
        assert await by_header.closed(timeout=10) == 4008
    finally:
        await by_header.close()
        await by_proto.close()
    own_cluster.stop()  # SIGTERM: every log is complete

    logs = own_cluster.logs()
    logs["manage.py output"] = cli + revoke
    joined = "\n".join(logs.values())
    # The logs are real DEBUG logs that saw all of the above, so the test can fail.
    assert " DEBUG " in logs["e2e-logs-a"] and " DEBUG " in logs["e2e-logs-relay"]
    assert "credential in URL" in joined and "refused" in joined
    leaks = [(what, name) for what, value in secrets.items() for name, log in logs.items() if value in log]
    assert leaks == []
    for header in ("Bearer", "Sec-WebSocket-Protocol", "tyrum-auth.", "access_token=", "?token="):
        assert header not in joined, header
