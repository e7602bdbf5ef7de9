"""ASGI entry point: HTTP (admin, health) and the ``/ws`` WebSocket endpoint.

Run one edge of a cluster with ``EDGE_ID=edge-a daphne tyrum.asgi:application``.
"""

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from backplane.process import freeze_startup_objects  # noqa: E402
from backplane.routing import websocket_urlpatterns  # noqa: E402
from backplane.vendor.daphne import install_denial_response  # noqa: E402

install_denial_response()


def _start_edge_eagerly() -> None:
    """With EDGE_ID set, register the edge (and its SIGTERM drain) as daphne starts, not at
    the first connection. Without it the edge id needs the port, known at the first connection."""
    if not os.environ.get("EDGE_ID") or "twisted.internet.reactor" not in sys.modules:
        return
    import asyncio

    from twisted.internet import reactor

    from backplane.edge import EdgeRuntime

    def start() -> None:
        task = asyncio.ensure_future(EdgeRuntime.get())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retried at first connection

    reactor.callWhenRunning(start)


_start_edge_eagerly()
freeze_startup_objects()

# No AuthMiddlewareStack: the consumer resolves a session cookie itself, only when no
# token was offered and the Origin is allowed (backplane.auth).
# channels' stubs want their own URLPattern subtype, which django.urls.path() never returns.
application = ProtocolTypeRouter(
    {"http": django_asgi_app, "websocket": URLRouter(websocket_urlpatterns)}  # type: ignore[arg-type]
)
