"""The backplane's side of a project's ASGI application: the ``/ws`` endpoint and what an
edge needs around it.

A host project's ``asgi.py``::

    from django.core.asgi import get_asgi_application
    django_asgi_app = get_asgi_application()  # first: it sets Django up

    from backplane.asgi import application_for
    application = application_for(django_asgi_app)

``application_for`` refuses to start an edge of a cluster on the development ``SECRET_KEY``
(``DEBUG`` off), teaches daphne the refusals the protocol needs and keeps query strings out
of its access log (``vendor/daphne.py``), and routes WebSocket upgrades: ``/ws`` to the
gateway consumer behind a ``Host`` check against ``ALLOWED_HOSTS``, anything else to a 404.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http.request import split_domain_port, validate_host

from backplane import refusals

logger = logging.getLogger(__name__)

Scope = Any  # an ASGI scope (channels types each kind apart)


def application_for(http_app: Any) -> Any:
    """The project's ASGI application: ``http_app`` for HTTP, the backplane for WebSockets."""
    from channels.routing import ProtocolTypeRouter

    from backplane import logs
    from backplane.conf import conf
    from backplane.process import defer_full_collections, freeze_connections, freeze_startup_objects
    from backplane.vendor import channels_redis as vendor_redis
    from backplane.vendor import daphne as vendor_daphne
    from backplane.vendor import keepalive

    refuse_unsafe_start("an edge")
    vendor_redis.install_buffered_receive()
    vendor_daphne.install_denial_response()
    vendor_daphne.install_lean_checkers()
    keepalive.install_fast_pong()
    vendor_daphne.install_access_log_without_query_strings()
    vendor_daphne.install_lazy_handshake_debug()
    vendor_daphne.install_listen_backlog()
    if logs.json_format():  # every line one JSON object, daphne's access log included
        vendor_daphne.install_access_log_as_records()
    vendor_daphne.install_limits(conf.MAX_INBOUND_FRAME_BYTES, conf.REQUEST_HEADER_TIMEOUT_SECS)
    from backplane.metrics import MetricsEndpoint

    app = ProtocolTypeRouter({"http": MetricsEndpoint(http_app), "websocket": websocket_application()})
    _start_edge_eagerly()
    freeze_startup_objects()
    defer_full_collections()  # a connect storm's sockets are not walked again at every 25 % (0032)
    freeze_connections()  # nor the long-lived ones at all, once they are many (0040)
    return app


def websocket_application() -> Any:
    """``/ws`` (behind the ``Host`` check), and a 404 for every other path."""
    from channels.routing import URLRouter
    from django.urls import re_path

    from backplane.routing import websocket_urlpatterns

    routes: list[Any] = [*websocket_urlpatterns, re_path(r"", refuse_404)]  # type: ignore[arg-type]
    return AllowedHosts(URLRouter(routes))


def refuse_unsafe_start(role: str) -> None:
    """Refuse to run a cluster process (an edge, a relay) on the public development
    ``SECRET_KEY`` with ``DEBUG`` off: sessions and signed values would be forgeable. The
    embedded mode (``serve`` on SQLite and the in-process layer) may, for trying it out."""
    from backplane.conf import DEVELOPMENT_SECRET_KEY, conf

    if settings.DEBUG or settings.SECRET_KEY != DEVELOPMENT_SECRET_KEY:
        return
    if conf.embedded_layer and not conf.is_postgresql:
        return
    raise ImproperlyConfigured(
        f"refusing to start {role} of a cluster on the development SECRET_KEY: set SECRET_KEY in the "
        "environment (or DEBUG=1 for a development machine)"
    )


class AllowedHosts:
    """Refuse a WebSocket upgrade whose ``Host`` is not in ``ALLOWED_HOSTS`` (HTTP 400, as
    Django answers a request for a host it does not serve), before anything else runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and not host_allowed(scope):
            refusals.log(logger, logging.WARNING, "refused_host", "refused: Host not in ALLOWED_HOSTS")
            await _deny(scope, receive, send, 400)
            return
        await self.app(scope, receive, send)


def host_allowed(scope: Scope) -> bool:
    host = b""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"host":
            host = value
            break
    return _host_ok(host, tuple(settings.ALLOWED_HOSTS), settings.DEBUG)


@functools.lru_cache(maxsize=256)
def _host_ok(host: bytes, allowed_hosts: tuple[str, ...], debug: bool) -> bool:
    """Django's host check, remembered per (Host, settings): a connect storm sends the same
    few Host values thousands of times. Bounded: unknown Hosts only push older ones out."""
    domain, _port = split_domain_port(host.decode("latin1"))
    allowed = list(allowed_hosts)
    if debug and not allowed:  # Django's own default for a development machine
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    return bool(domain) and validate_host(domain, allowed)


async def refuse_404(scope: Scope, receive: Any, send: Any) -> None:
    """An upgrade to a path that is not the gateway's: 404, not a server error."""
    refusals.log(logger, logging.INFO, "refused_path", "refused: no WebSocket endpoint at this path")
    await _deny(scope, receive, send, 404)


async def _deny(scope: Scope, receive: Any, send: Any, status: int) -> None:
    """Take the upgrade request and refuse it with ``status`` (``deny``)."""
    message = await receive()
    if message.get("type") == "websocket.connect":
        await refusals.deny(scope, send, status)


def _start_edge_eagerly() -> None:
    """With EDGE_ID set, register the edge (and its SIGTERM drain) as daphne starts, not at
    the first connection. Without it the edge id needs the port, known at the first connection."""
    if not os.environ.get("EDGE_ID") or "daphne.server" not in sys.modules:
        return
    import asyncio

    from twisted.internet import reactor

    from backplane.edge import EdgeRuntime

    def start() -> None:
        task = asyncio.ensure_future(EdgeRuntime.get())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retried at first connection

    reactor.callWhenRunning(start)
