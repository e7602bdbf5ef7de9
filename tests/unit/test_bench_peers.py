"""bench/peers.js, the Node load client: its self-check against a scripted server on
127.0.0.1 (bench/peers_selfcheck.js) — exact counts whatever the framing, pings answered,
close codes, the failover's resume — for the hand-written client and, when the bench's
``ws`` package is installed, the ``ws`` one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
WS_MODULES = BENCH.parent / "var" / "bench" / "peer-socketio" / "node_modules"


def _selfcheck(env: dict[str, str]) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    result = subprocess.run(
        [node, str(BENCH / "peers_selfcheck.js")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NODE_OPTIONS": "", **env},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "self-check ok" in result.stdout


def test_peers_js__raw_client_counts_exactly() -> None:
    _selfcheck({"BENCH_PEERS_WS": "raw"})


def test_peers_js__ws_client_counts_exactly() -> None:
    if not (WS_MODULES / "ws").is_dir():
        pytest.skip("the bench's `ws` package is not installed (bench/load.py installs it)")
    _selfcheck({"BENCH_PEERS_WS": "ws", "BENCH_NODE_MODULES": str(WS_MODULES)})
