"""A relay's small HTTP port (``run_backplane --http-port``): ``/metrics``, ``/livez``, ``/readyz``.

A relay serves no other HTTP, so this is a few lines of asyncio rather than a server: one
request per connection, ``GET`` only, answered and closed. Readiness: the relay's database
session is alive (or it is still taking shards) and Redis answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from channels.db import database_sync_to_async

from backplane import metrics, status

logger = logging.getLogger(__name__)

# A request's head must arrive within this long, and be no larger than this.
REQUEST_TIMEOUT_SECS = 5.0
MAX_REQUEST_BYTES = 8192


async def serve(relay: Any, port: int, host: str = "0.0.0.0") -> asyncio.Server:  # noqa: S104  (scraped from other hosts)
    """Start answering on ``port``; the caller closes the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECS)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            lines = head.decode("latin1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            auth = next((v.strip() for k, v in headers.items() if k.strip().lower() == "authorization"), None)
            code, ctype, body = await answer(relay, method, path.split("?", 1)[0], auth)
        except (ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            code, ctype, body = 400, "text/plain", b"bad request\n"
        try:
            writer.write(
                f"HTTP/1.1 {code} {_PHRASES.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
    logger.info("relay HTTP port %d: /metrics /livez /readyz", port, extra={"action": "http_start"})
    return server


async def answer(relay: Any, method: str, path: str, auth: str | None) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"method not allowed\n"
    if path == "/livez":
        return 200, "application/json", b'{"ok": true}'
    if path == "/readyz":
        return await readiness(relay)
    if path == "/metrics":
        try:
            relay.backlog = await database_sync_to_async(status.backlog)()
        except Exception as exc:  # the metrics still answer; the backlog gauges are left out
            relay.backlog = None
            relay.errors["backlog_read"] += 1
            logger.warning("could not read the backlog: %s", type(exc).__name__, extra={"action": "metrics_error"})
        return metrics.exposition(auth)
    return 404, "text/plain", b"not found\n"


async def readiness(relay: Any) -> tuple[int, str, bytes]:
    """200 when the database and Redis answer, 503 naming the part that does not."""
    failing: dict[str, str] = {}
    try:
        await database_sync_to_async(_database_ping)()
    except Exception as exc:
        failing["database"] = f"unreachable ({type(exc).__name__})"
    try:
        await asyncio.to_thread(status.redis_ping)
    except Exception as exc:
        failing["redis"] = f"unreachable ({type(exc).__name__})"
    if failing:
        return 503, "application/json", json.dumps({"ok": False, **failing}).encode()
    return 200, "application/json", json.dumps({"ok": True, "shards": len(relay.leases.owned)}).encode()


def _database_ping() -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT 1")


_PHRASES = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
