"""HTTP endpoints beside the WebSocket: the probes of load balancers and kubelets.

``/livez`` (and ``/healthz``) answer 200 while the process serves HTTP (liveness: restart it
when it does not). ``/readyz`` answers 200 when the database and Redis answer and this edge
is not draining (readiness: send it traffic), 503 naming the failing part. ``ProbeMiddleware``
answers them before Django validates the ``Host`` header, since probes come by IP address.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse


def livez(request: HttpRequest) -> JsonResponse:
    """Answer 200: the process is alive and serving HTTP."""
    return JsonResponse({"ok": True})


def readyz(request: HttpRequest) -> JsonResponse:
    """Answer 200 when the database and Redis answer and no edge of this process drains, 503
    naming the failing part otherwise."""
    from backplane import status

    if _draining():
        return JsonResponse({"ok": False, "edge": "draining"}, status=503)
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
    except DatabaseError:
        return JsonResponse({"ok": False, "database": "unreachable"}, status=503)
    try:
        status.redis_ping()  # 2 s at most; nothing in the embedded mode
    except Exception as exc:
        return JsonResponse({"ok": False, "redis": f"unreachable ({type(exc).__name__})"}, status=503)
    return JsonResponse({"ok": True})


healthz = livez  # liveness: the process serves (readiness is /readyz)

PROBES: dict[str, Callable[[HttpRequest], JsonResponse]] = {"/livez": livez, "/readyz": readyz, "/healthz": healthz}


def _draining() -> bool:
    import sys

    edge = sys.modules.get("backplane.edge")  # only an edge process has imported it
    return edge is not None and any(runtime.draining for runtime in list(edge.EdgeRuntime._by_loop.values()))


class ProbeMiddleware:
    """Answer the probes whatever the ``Host`` header: first in ``MIDDLEWARE``, before
    ``SecurityMiddleware`` (an HTTPS redirect) and ``CommonMiddleware`` (``ALLOWED_HOSTS``)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        probe = PROBES.get(request.path_info)
        if probe is not None and request.method in ("GET", "HEAD"):
            return probe(request)
        return self.get_response(request)
