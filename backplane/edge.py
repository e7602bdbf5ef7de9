"""The edge runtime: one per ASGI process (event loop).

It registers the edge, heartbeats its directory rows, receives directed commands on
``bp.<prefix>.edge.<edge_id>``, re-checks its sockets' tokens, and compares the heads of its
connected streams with what its peers got, so a lost trailing message is filled from the
outbox within about a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db.models import Q
from django.utils import timezone

from backplane import outbox, streams
from backplane.conf import conf, edge_id
from backplane.models import AccessToken, Connection, Edge

if TYPE_CHECKING:
    from backplane.consumers import GatewayConsumer

logger = logging.getLogger(__name__)

# Largest number of stream keys in one head query.
HEAD_QUERY_CHUNK = 1000


class EdgeRuntime:
    _by_loop: dict[asyncio.AbstractEventLoop, EdgeRuntime] = {}

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.layer = get_channel_layer()
        self.consumers: dict[str, GatewayConsumer] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.channel: str | None = None
        self._started = asyncio.Event()

    @classmethod
    async def get(cls, port: int | None = None) -> EdgeRuntime:
        """Return this loop's runtime, starting it on first use."""
        loop = asyncio.get_running_loop()
        runtime = cls._by_loop.get(loop)
        if runtime is None:
            runtime = cls(edge_id(port))
            cls._by_loop[loop] = runtime
            await runtime.start()
        await runtime._started.wait()
        return runtime

    async def start(self) -> None:
        if not streams.EDGE_ID_RE.match(self.edge_id):
            raise ValueError(f"malformed EDGE_ID {self.edge_id!r}")
        await database_sync_to_async(_register_edge)(self.edge_id)
        self.channel = await self.layer.new_channel("edge.")
        await self.layer.group_add(streams.edge_group(conf.channel_prefix, self.edge_id), self.channel)
        self.tasks = [
            asyncio.create_task(self._commands()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._head_check()),
        ]
        self._started.set()
        logger.info("edge %s started", self.edge_id, extra={"action": "edge_start"})

    def add(self, consumer: GatewayConsumer) -> None:
        self.consumers[consumer.connection_id] = consumer

    def remove(self, consumer: GatewayConsumer) -> None:
        self.consumers.pop(consumer.connection_id, None)

    # --- directed commands ----------------------------------------------------------

    async def _commands(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message = await self.layer.receive(self.channel)
                await self.handle_command(json.loads(message["body"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge command loop: %s", type(exc).__name__, extra={"action": "command_error"})
                await asyncio.sleep(0.5)

    async def handle_command(self, body: dict[str, Any]) -> None:
        """Carry out one directed command; idempotent (commands arrive at least once)."""
        command = body.get("command")
        code = int(body.get("code", 4008))
        targets: list[GatewayConsumer] = []
        if command == "disconnect":
            token_id = body.get("token_id")
            device = body.get("device_id")
            for c in self.consumers.values():
                if (token_id and str(c.principal.token_id) == token_id) or (
                    device and c.principal.device_id == device and str(c.principal.tenant_id) == body.get("tenant_id")
                ):
                    targets.append(c)
        elif command == "resync":
            code = 4409
            targets = [c for c in self.consumers.values() if str(c.principal.tenant_id) == body.get("tenant_id")]
        logger.info("edge command %s closes %d sockets", command, len(targets), extra={"action": "command"})
        for c in targets:
            await c.close_with(code)

    # --- heartbeat: directory rows and token re-check -------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(conf.HEARTBEAT_INTERVAL_SECS)
            try:
                token_ids = {c.principal.token_id for c in self.consumers.values() if c.principal.token_id}
                bad = await database_sync_to_async(_beat)(self.edge_id, token_ids)
                for c in list(self.consumers.values()):
                    if c.principal.token_id in bad:
                        await c.close_with(bad[c.principal.token_id])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge heartbeat failed: %s", type(exc).__name__, extra={"action": "heartbeat_error"})

    # --- head check: find and fill trailing loss ------------------------------------

    async def _head_check(self) -> None:
        while True:
            await asyncio.sleep(conf.HEAD_CHECK_INTERVAL_SECS)
            try:
                await self.check_heads()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("edge head check failed: %s", type(exc).__name__, extra={"action": "head_check_error"})

    async def check_heads(self) -> None:
        consumers = [c for c in self.consumers.values() if c.cursors]
        keys = sorted({k for c in consumers for k in c.keys.values()})
        heads: dict[str, outbox.Head] = {}
        for start in range(0, len(keys), HEAD_QUERY_CHUNK):
            heads.update(await database_sync_to_async(outbox.stream_heads)(keys[start : start + HEAD_QUERY_CHUNK]))
        for c in consumers:
            await c.observe_heads(heads)


def _register_edge(eid: str) -> None:
    now = timezone.now()
    Edge.objects.update_or_create(
        edge_id=eid, defaults={"host": socket.gethostname(), "heartbeat_at": now, "started_at": now}
    )


def _beat(eid: str, token_ids: set[Any]) -> dict[Any, int]:
    """Refresh this edge's rows in two statements; sweep dead rows; return tokens to close."""
    now = timezone.now()
    ttl = timedelta(seconds=conf.CONNECTION_TTL_SECS)
    if not Edge.objects.filter(edge_id=eid).update(heartbeat_at=now):
        _register_edge(eid)
    Connection.objects.filter(edge_id=eid).update(expires_at=now + ttl, last_seen_at=now)
    # Rows of edges that died without a clean close.
    Connection.objects.filter(expires_at__lt=now).delete()
    Edge.objects.filter(heartbeat_at__lt=now - ttl).exclude(edge_id=eid).delete()
    if not token_ids:
        return {}
    bad: dict[Any, int] = {}
    rows = (
        AccessToken.objects.filter(id__in=token_ids)
        .filter(Q(revoked_at__isnull=False) | Q(tenant__is_active=False) | Q(expires_at__lte=now))
        .values_list("id", "revoked_at", "tenant__is_active", "expires_at")
    )
    for tid, revoked_at, active, _expires_at in rows:
        bad[tid] = 4008 if (revoked_at is not None or not active) else 4401
    return bad


def install_daphne_denial_response() -> None:
    """Teach daphne the ASGI "websocket.http.response" extension for HTTP 503 refusals.

    Daphne answers every refused upgrade with 403; PROTOCOL.md wants 503 when the edge
    cannot check a credential right now, so peers retry with backoff.
    """
    try:
        from autobahn.websocket.types import ConnectionDeny
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not running under daphne
        return
    if getattr(WebSocketProtocol, "_tyrum_denial", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self: Any, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.http.response.start" and self.state == self.STATE_CONNECTING:
            self.handshake_deferred.errback(ConnectionDeny(code=int(message.get("status", 503)), reason="Unavailable"))
            del self.handshake_deferred
            self.server.protocol_disconnected(self)
            return
        if kind == "websocket.http.response.body":
            return
        original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._tyrum_denial = True
