"""Embedded mode smoke test: ``manage.py serve`` on SQLite with the in-process layer, fed by
commands in other processes (the README's "run it" path), with a stock WebSocket peer."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from harness import procs, waits
from harness.env import child_env
from harness.peer import Peer

pytestmark = pytest.mark.e2e


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1].strip()


def assigned(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM backplane_outboxitem WHERE stream_offset IS NOT NULL "
                                "AND kind = 'event'").fetchone()[0])


async def test_serve__embedded_gateway_delivers_resumes_and_revokes(tmp_path: Path) -> None:
    db = tmp_path / "embedded.sqlite3"
    env = child_env(DATABASE_URL=f"sqlite:///{db}", REDIS_URL="")

    def manage(*args: str) -> str:
        return procs.manage(*args, env=env)

    manage("migrate", "--no-input", "-v", "0")
    tenant_id = last_line(manage("create_tenant", "Embedded Co"))
    assert len(tenant_id) == 36
    created = manage("create_token", "--tenant", "embedded-co", "--device", "dev-1", "--role", "client").splitlines()
    token, token_id = created[-1], created[-2].split()[2]  # "token id <id> for …", then the token
    port = waits.free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    serve = procs.Proc("serve", [procs.PYTHON, "manage.py", "serve", "--port", str(port)], env, log_dir)
    try:
        waits.wait_port(port, timeout=30)
        url = f"ws://127.0.0.1:{port}/ws"
        peer = await Peer.open(url, token)
        try:
            assert peer.hello["protocol"] == "tyrum-v1"
            first = last_line(await asyncio.to_thread(
                manage, "publish_event", "--tenant", "embedded-co", "--type", "run.updated",
                "--payload", '{"n": 1}', "--device", "dev-1"))
            events = await peer.until_events(1, timeout=10)
            assert [(e["stream"], e["offset"], e["event"]["event_id"]) for e in events] == [("device", 1, first)]
            epoch = events[0]["epoch"]
        finally:
            await peer.close()

        missed = [last_line(await asyncio.to_thread(
            manage, "publish_event", "--tenant", tenant_id, "--type", "run.updated",
            "--payload", f'{{"n": {n}}}', "--device", "dev-1")) for n in (2, 3)]
        deadline = time.monotonic() + 10  # serve's relay polls every 250 ms for other processes' rows
        while assigned(db) < 3:
            assert time.monotonic() < deadline, "serve did not assign the new events"
            await asyncio.sleep(0.1)

        again = await Peer.open(url, token, auth="subprotocol")
        try:
            assert again.head("device") == (epoch, 3)
            await again.send({"type": "resume", "streams": {"device": {"epoch": epoch, "offset": 1}}})
            await again.until(lambda p: p.frames[-1]["type"] == "resumed", what="resumed")
            assert [(e["offset"], e["event"]["event_id"]) for e in again.events] == [(2, missed[0]), (3, missed[1])]
            assert again.frames[-1]["streams"] == {"device": {"recovered": True, "replayed": 2}}
            await asyncio.to_thread(manage, "revoke_token", token_id)
            assert await again.closed(timeout=10) == 4008
        finally:
            await again.close()
    finally:
        code = serve.stop(timeout=10)
    log = serve.log_path.read_text(errors="replace")
    assert code == 0, f"serve did not stop cleanly on SIGTERM ({code}): {log[-2000:]}"
    assert "Traceback" not in log, log[-3000:]
