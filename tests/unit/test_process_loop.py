"""The event loop under relays and edges (backplane.process): uvloop unless
BACKPLANE_EVENT_LOOP=asyncio, and daphne's twisted loop made on it by backplane.run_edge."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from backplane import process


def test_event_loop__uvloop_by_default_asyncio_on_request(monkeypatch: Any) -> None:
    monkeypatch.delenv(process.EVENT_LOOP_VARIABLE, raising=False)
    assert process.event_loop() == "uvloop"
    monkeypatch.setenv(process.EVENT_LOOP_VARIABLE, " AsyncIO ")
    assert process.event_loop() == "asyncio"
    monkeypatch.setenv(process.EVENT_LOOP_VARIABLE, "trio")
    with pytest.raises(ValueError, match="BACKPLANE_EVENT_LOOP"):
        process.event_loop()


def test_run__runs_on_the_chosen_loop(monkeypatch: Any) -> None:
    async def loop_module() -> str:
        import asyncio

        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    monkeypatch.delenv(process.EVENT_LOOP_VARIABLE, raising=False)
    assert process.run(loop_module()) == "uvloop"
    monkeypatch.setenv(process.EVENT_LOOP_VARIABLE, "asyncio")
    assert process.run(loop_module()) == "asyncio"


@pytest.mark.parametrize(("choice", "loop"), [("", "uvloop.Loop"), ("asyncio", "_UnixSelectorEventLoop")])
def test_run_edge__daphne_makes_twisted_loop_on_the_chosen_loop(choice: str, loop: str) -> None:
    # A fresh interpreter: daphne makes its loop once, when its server module is imported.
    code = (
        "from backplane.process import install_event_loop_policy; install_event_loop_policy()\n"
        "import daphne.server\n"
        "from twisted.internet import reactor\n"
        "assert reactor._asyncioEventloop is daphne.server.twisted_loop\n"
        "kind = type(daphne.server.twisted_loop)\n"
        "print('uvloop.Loop' if kind.__module__.startswith('uvloop') else kind.__qualname__)\n"
    )
    env = {"PATH": "/usr/bin:/bin", process.EVENT_LOOP_VARIABLE: choice}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == loop


def test_defer_full_collections__only_the_full_collections_wait_longer() -> None:
    import gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        process.defer_full_collections()
        assert gc.get_threshold() == (700, 10, process.FULL_COLLECTION_EVERY)
        assert process.FULL_COLLECTION_EVERY > 10  # CPython's own: what a storm paid for
    finally:
        gc.set_threshold(*before)
