"""``LOG_FORMAT=json``: every line a real edge, relay and ``serve`` write is one JSON object with
time, level, logger, message and the ``extra`` fields, and none holds a payload or a token
(backplane/logs.py)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import pytest

from harness import procs, waits
from harness.data import make_tenant, make_token, orm, publish, wait_forwarded
from harness.peer import Peer, refused_status
from harness.procs import PYTHON, Proc

pytestmark = pytest.mark.e2e

JSON_ENV = {"LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG", "DAPHNE_LOG_LEVEL": "INFO"}


def parse_lines(name: str, text: str, secrets: list[str]) -> list[dict[str, Any]]:
    """Every line of a log as JSON, checked for the fields and against ``secrets``."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{name} line {n} is not JSON: {line[:300]!r}") from None
        assert isinstance(record, dict), (name, n, line[:300])
        assert {"time", "level", "logger", "message"} <= record.keys(), (name, n, record)
        datetime.fromisoformat(record["time"])
        for secret in secrets:
            assert secret not in line, f"{name} line {n} holds a secret: {line[:300]!r}"
        records.append(record)
    assert records, f"{name} wrote nothing"
    return records


async def traffic(url: str) -> list[str]:
    """Connect, be refused, receive a published event; return what must never be logged."""
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "dev-1")
    unknown = "tyr_" + uuid.uuid4().hex + "unknown"
    marker = f"payload-marker-{uuid.uuid4().hex}"
    peer = await Peer.open(url, token)
    try:
        assert await refused_status(url, token=unknown) == 403
        await orm(publish, tenant, "note.added", {"note": marker})
        await peer.until_events(1, timeout=15)
        await wait_forwarded(tenant)
    finally:
        await peer.close()
    return [token, unknown, marker]


async def test_json_logs__edge_and_relay_write_one_object_per_line(own_cluster, tmp_path) -> None:
    own_cluster.env = {**own_cluster.env, **JSON_ENV}
    port = waits.free_port()
    # daphne's access log to its standard output, as by default: as JSON records too.
    edge_proc = own_cluster.spawn("e2e-json-edge", procs.daphne_args(port), {"EDGE_ID": "e2e-json-edge"})
    waits.wait_port(port, timeout=30)
    own_cluster.start_relay("e2e-json-relay")
    secrets = await traffic(f"ws://127.0.0.1:{port}/ws")
    own_cluster.stop()  # SIGTERM: the shutdown's lines are checked too
    edge = parse_lines("edge", edge_proc.log(), secrets)
    access = [r for r in edge if r.get("action") == "access"]
    assert any("WSCONNECT /ws" in r["request"] for r in access), access[:5]
    relay = parse_lines("relay", own_cluster.relays[0].log(), secrets)
    edge_actions = {r.get("action") for r in edge}
    assert {"edge_start", "connected"} <= edge_actions, edge_actions
    assert any(r["logger"] == "backplane.consumers" and r["level"] == "info" for r in edge)
    relay_actions = {r.get("action") for r in relay}
    assert {"relay_start", "lease_acquired", "relay_stop", "relay_summary"} <= relay_actions, relay_actions


async def test_json_logs__serve_writes_one_object_per_line(module_env, tmp_path) -> None:
    port = waits.free_port()
    env = {**module_env, **JSON_ENV, "REDIS_URL": "", "EDGE_ID": "e2e-json-serve"}
    serve = Proc("e2e-json-serve", [PYTHON, "manage.py", "serve", "--port", str(port)], env, tmp_path)
    try:
        waits.wait_port(port, timeout=30)
        secrets = await traffic(f"ws://127.0.0.1:{port}/ws")
    finally:
        serve.stop()
    records = parse_lines("serve", serve.log(), secrets)
    actions = {r.get("action") for r in records}
    assert {"serve_start", "edge_start", "relay_start", "connected"} <= actions, actions
