"""Refusing a WebSocket upgrade: the HTTP status it gets, and the log line it leaves.

Shared by the routing in front of the consumer (``asgi.py``: Host, path) and the consumer
(``consumers.py``: credentials, throttles, caps). Refusals happen before any authentication,
so whatever a client sends, their log lines are rate-limited: one per kind every
``INTERVAL_SECS`` on an edge, with a count of those held back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from backplane.limits import LogLimiter
from backplane.protocol import Close
from backplane.vendor import daphne as vendor_daphne

INTERVAL_SECS = 10.0
_LOGS = LogLimiter(INTERVAL_SECS)


def log(logger: logging.Logger, level: int, action: str, msg: str, *args: Any) -> None:
    """Log a refusal (``action`` is its kind), unless one of its kind went out just now."""
    _LOGS.log(logger, level, action, time.monotonic(), msg, *args)


async def deny(scope: Any, send: Any, status: int) -> None:
    """Refuse a WebSocket upgrade with an HTTP status: the ASGI denial response where the
    server has it (daphne, taught by ``vendor.daphne.install_denial_response``; a server
    that says so in the scope's extensions), else a plain refusal (403)."""
    if vendor_daphne.protocol_of(send) is None and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": int(Close.NORMAL)})
        return
    await send({"type": "websocket.http.response.start", "status": status, "headers": []})
    await send({"type": "websocket.http.response.body", "body": b""})
