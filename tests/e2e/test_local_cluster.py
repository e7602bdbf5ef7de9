"""``make cluster`` (deploy/local_cluster.py): the compose topology as local processes comes up
on this machine's PostgreSQL and Redis, prints its URLs, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from harness import procs, waits
from harness.procs import ROOT

pytestmark = pytest.mark.e2e

UP_TIMEOUT_SECS = 90.0


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_local_cluster__comes_up_prints_urls_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    if not db["ENGINE"].endswith("postgresql") or not settings.REDIS_URL:
        pytest.fail("needs DATABASE_URL=postgres://… and REDIS_URL (run it with `make test`)")
    server = f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    name = f"tyrum_cluster_{os.getpid()}"
    env = {
        **os.environ,
        "CLUSTER_DATABASE_URL": f"{server}/{name}",
        "CLUSTER_REDIS_URL": settings.REDIS_URL,
        "CLUSTER_CHANNEL_PREFIX": f"{settings.BACKPLANE_CHANNEL_PREFIX}cluster",
        "PYTHONUNBUFFERED": "1",
    }
    out_path = tmp_path / "cluster.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [procs.PYTHON, "deploy/local_cluster.py"],
            cwd=ROOT,
            env=env,  # noqa: S603
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        waits.wait_for(
            lambda: "Ctrl-C stops the cluster." in out_path.read_text() or proc.poll() is not None,
            timeout=UP_TIMEOUT_SECS,
            interval=0.2,
            what="the cluster to come up",
        )
        text = out_path.read_text()
        ports = [int(p) for p in re.findall(r"^edge  ws://127\.0\.0\.1:(\d+)/ws", text, re.M)]
        assert len(ports) == 2, text
        assert "relays relay-a, relay-b" in text
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:  # noqa: S310
                assert response.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out_path.read_text()[-3000:]
        deadline = time.monotonic() + 10
        while any(listening(port) for port in ports):
            assert time.monotonic() < deadline, "an edge still listens after the cluster stopped"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
