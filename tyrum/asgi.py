"""ASGI entry point: HTTP (admin, health) and the ``/ws`` WebSocket endpoint.

Run one edge of a cluster with ``EDGE_ID=edge-a daphne tyrum.asgi:application``.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tyrum.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()  # first: it sets Django up

from backplane.asgi import application_for  # noqa: E402

# No AuthMiddlewareStack: the consumer resolves a session cookie itself, only when no
# token was offered and the Origin is allowed (backplane.auth).
application = application_for(django_asgi_app)
