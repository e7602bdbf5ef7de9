"""The WebSocket upgrade's Host check (``backplane.asgi.host_allowed``), remembered per Host."""

from __future__ import annotations

from typing import Any

from backplane import asgi


def _scope(host: bytes) -> dict[str, Any]:
    return {"type": "websocket", "headers": [(b"user-agent", b"t"), (b"Host", host)]}


def test_host_allowed__follows_allowed_hosts_after_a_remembered_answer(settings: Any) -> None:
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["edge.example"]
    assert asgi.host_allowed(_scope(b"edge.example:8000"))
    assert not asgi.host_allowed(_scope(b"other.example"))
    settings.ALLOWED_HOSTS = ["other.example"]  # a changed setting is not answered from memory
    assert not asgi.host_allowed(_scope(b"edge.example:8000"))
    assert asgi.host_allowed(_scope(b"other.example"))


def test_host_allowed__no_host_header_is_refused_and_debug_allows_localhost(settings: Any) -> None:
    settings.ALLOWED_HOSTS = []
    settings.DEBUG = False
    assert not asgi.host_allowed({"type": "websocket", "headers": []})
    assert not asgi.host_allowed(_scope(b"localhost"))
    settings.DEBUG = True
    assert asgi.host_allowed(_scope(b"localhost"))
    assert not asgi.host_allowed(_scope(b"evil.example"))


def test_host_allowed__remembers_a_bounded_number_of_hosts(settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["edge.example"]
    for n in range(1000):
        asgi.host_allowed(_scope(f"h{n}.example".encode()))
    assert asgi._host_ok.cache_info().currsize <= 256
