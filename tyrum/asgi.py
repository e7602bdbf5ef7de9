"""ASGI entry point: HTTP (admin, health) and the ``/ws`` WebSocket endpoint.

Run one edge of a cluster with ``EDGE_ID=edge-a daphne tyrum.asgi:application``.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from backplane.edge import install_daphne_denial_response  # noqa: E402
from backplane.routing import websocket_urlpatterns  # noqa: E402

install_daphne_denial_response()

# No AuthMiddlewareStack: the consumer resolves a session cookie itself, only when no
# token was offered and the Origin is allowed (backplane.auth).
application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": URLRouter(websocket_urlpatterns)})
