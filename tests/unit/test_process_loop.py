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


def test_freezer__freezes_after_many_opened_thaws_after_a_share_of_them_closed(monkeypatch: Any) -> None:
    """An edge's connections are frozen once FREEZE_AFTER_OPENED opened since the last freeze
    (the young generations collected first), and thawed once a quarter of those frozen closed
    (their cyclic garbage is freed only then, so it freezes again only after a full
    collection) (docs/decisions/0040)."""
    import gc

    calls: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(f"collect {generation}") or 0)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    full = [7]  # full collections so far
    monkeypatch.setattr(gc, "get_stats", lambda: [{}, {}, {"collections": full[0]}])
    monkeypatch.setattr(process, "FREEZE_AFTER_OPENED", 10)
    f = process.Freezer()
    for _ in range(9):
        f.connected()
    f.tick()
    assert calls == []  # not yet many
    for _ in range(31):
        f.connected()
    f.tick()
    assert calls == ["collect 1", "freeze"] and f.frozen == 40
    f.tick()
    assert calls == ["collect 1", "freeze"]  # nothing new
    for _ in range(9):
        f.disconnected()
    f.tick()
    assert calls == ["collect 1", "freeze"]  # 9 of 40 closed: under a quarter
    f.disconnected()
    f.tick()
    assert calls[2:] == ["unfreeze"] and f.frozen == 0 and f.opened == 30  # the 30 open: frozen again
    f.tick()
    assert calls[3:] == []  # not before a full collection freed the closed ones' garbage
    full[0] += 1
    f.tick()
    assert calls[3:] == ["collect 1", "freeze"] and f.frozen == 30 and f.thaws == 1


def test_freezer__only_an_edge_counts_its_connections(monkeypatch: Any) -> None:
    """``freeze_connections`` makes the process's one Freezer, which daphne's hooks feed."""
    from daphne.server import Server
    from daphne.ws_protocol import WebSocketProtocol

    from backplane.vendor import daphne as vendor_daphne

    if not getattr(Server, "_tyrum_lean_checkers", False):
        # Installed here: daphne's classes as they were after the test (others read their source).
        for name in ("protocol_connected", "protocol_disconnected", "create_application", "application_checker"):
            monkeypatch.setattr(Server, name, getattr(Server, name))
        monkeypatch.setattr(Server, "timeout_checker", Server.timeout_checker)
        monkeypatch.setattr(WebSocketProtocol, "onOpen", WebSocketProtocol.onOpen)
        monkeypatch.setattr(Server, "_tyrum_lean_checkers", False, raising=False)
        vendor_daphne.install_lean_checkers()
    before = process.freezer
    try:
        process.freezer = None
        made = process.freeze_connections()
        assert process.freeze_connections() is made and process.freezer is made
        server = Server.__new__(Server)
        server.connections = {}
        proto, kept = (WebSocketProtocol.__new__(WebSocketProtocol) for _ in range(2))
        request = object()  # the HTTP request a socket's upgrade came in on: not a socket
        server.protocol_connected(request)
        server.protocol_connected(proto)
        server.protocol_connected(kept)
        assert made.open == 2 and made.opened == 2
        server.protocol_disconnected(request)
        server.protocol_disconnected(proto)
        server.protocol_disconnected(proto)  # a refused handshake: the refusal, then onClose
        assert made.open == 1  # counted once
    finally:
        process.freezer = before
