"""The WebSocket consumer: one per peer socket, exactly per PROTOCOL.md (``tyrum-v1``).

Per stream it keeps a ``DeliveryCursor``: live batches below the cursor are repeats and
dropped; a batch beyond it means the transport lost something, and the gap is read from
the outbox before the batch is sent. Live delivery is held for a new connection until its
first frame (or LIVE_HOLD_MS), so a resume's replay is never overtaken by live events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import IntegrityError, transaction
from django.utils import timezone

from backplane import auth, exceptions, outbox, streams
from backplane.conf import conf
from backplane.edge import EdgeRuntime
from backplane.models import Connection

logger = logging.getLogger(__name__)

Batch = tuple[str, str, list[list[Any]]]  # (stream name, epoch, [[offset, frame], ...])


class _Closed(Exception):
    """Raised inside delivery when the socket was closed under it."""


class GatewayConsumer(AsyncWebsocketConsumer):
    connection_id: str
    principal: auth.Principal

    async def connect(self) -> None:
        self.connection_id = uuid.uuid4().hex
        self.keys: dict[str, str] = {}
        self.cursors: dict[str, streams.DeliveryCursor] = {}
        self.lag_seen: dict[str, int] = {}
        self.closed = False
        self.first_frame_seen = False
        self.holding = True
        self.held: list[Batch] = []
        self.lock = asyncio.Lock()
        self.runtime: EdgeRuntime | None = None
        self.tokens = float(conf.INBOUND_BURST)
        self.tokens_at = time.monotonic()
        if auth.url_has_credential(self.scope.get("query_string", b"")):
            logger.warning(
                "refused: credential in URL (path %s)",
                self.scope.get("path"),
                extra={"action": "refused_url_credential"},
            )
            await self.close()
            return
        if auth.PROTOCOL not in (self.scope.get("subprotocols") or []):
            logger.info("refused: subprotocol %s not offered", auth.PROTOCOL, extra={"action": "refused_protocol"})
            await self.close()
            return
        try:
            self.principal = await database_sync_to_async(auth.authenticate)(self.scope)
        except auth.AuthRefused as exc:
            logger.info("refused: %s", exc, extra={"action": "refused_auth"})
            await self.close()
            return
        except exceptions.StoreUnavailable:
            logger.warning("credential check unavailable: answering 503", extra={"action": "refused_unavailable"})
            await self._deny(503)
            return
        server = self.scope.get("server") or (None, None)
        try:
            self.runtime = await EdgeRuntime.get(server[1])
            if self.runtime.draining:
                self.runtime = None
                await self._deny(503)
                return
            p = self.principal
            self.keys = streams.connection_streams(p.tenant_id, p.role, p.device_id)
            prefix = conf.channel_prefix
            for key in self.keys.values():
                await self.channel_layer.group_add(streams.group_name(prefix, key), self.channel_name)
            heads = await database_sync_to_async(_open)(self, self.runtime.edge_id)
        except Exception as exc:
            logger.warning("connect failed: %s", type(exc).__name__, extra={"action": "connect_error"})
            await self._deny(503)
            return
        await self.accept(auth.PROTOCOL)
        self.hello_heads = {name: heads[key] for name, key in self.keys.items()}
        self.cursors = {name: streams.DeliveryCursor(h.epoch, h.offset) for name, h in self.hello_heads.items()}
        await self.send(
            text_data=json.dumps(
                {
                    "type": "hello",
                    "protocol": auth.PROTOCOL,
                    "connection_id": self.connection_id,
                    "edge_id": self.runtime.edge_id,
                    "streams": {name: {"epoch": h.epoch, "offset": h.offset} for name, h in self.hello_heads.items()},
                },
                separators=(",", ":"),
            )
        )
        self.runtime.add(self)
        self.hold_task = asyncio.create_task(self._hold_timer())
        logger.info("connected %s", self.connection_id, extra={"action": "connected"})

    async def _deny(self, status: int) -> None:
        """Refuse the upgrade with an HTTP status (see edge.install_daphne_denial_response)."""
        await self.base_send({"type": "websocket.http.response.start", "status": status, "headers": []})
        await self.base_send({"type": "websocket.http.response.body", "body": b""})

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if self.runtime is None or not self.keys:
            return
        self.runtime.remove(self)
        hold = getattr(self, "hold_task", None)
        if hold is not None:
            hold.cancel()
        prefix = conf.channel_prefix
        for key in self.keys.values():
            with contextlib.suppress(Exception):  # the transport may be down; the socket is gone anyway
                await self.channel_layer.group_discard(streams.group_name(prefix, key), self.channel_name)
        try:
            await database_sync_to_async(Connection.objects.filter(connection_id=self.connection_id).delete)()
        except Exception as exc:  # the heartbeat sweep removes it later
            logger.warning("could not remove connection row: %s", type(exc).__name__, extra={"action": "disconnect"})
        logger.info("disconnected %s code %s", self.connection_id, code, extra={"action": "disconnected"})

    def directory_row(self) -> dict[str, Any]:
        p = self.principal
        return {
            "connection_id": self.connection_id,
            "tenant_id": p.tenant_id,
            "device_id": p.device_id,
            "role": p.role,
            "token_id": p.token_id,
            "channel_name": self.channel_name,
        }

    async def close_with(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            await self.close(code=code)

    # --- inbound frames -------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closed:
            return
        if text_data is None:
            await self.close_with(4400)
            return
        if len(text_data) > conf.MAX_INBOUND_FRAME_BYTES or len(text_data.encode()) > conf.MAX_INBOUND_FRAME_BYTES:
            await self.close_with(4009)
            return
        if not self._take_token():
            await self.close_with(4029)
            return
        try:
            frame = json.loads(text_data)
        except ValueError:
            frame = None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            await self.close_with(4400)
            return
        first = not self.first_frame_seen
        self.first_frame_seen = True
        kind = frame["type"]
        if kind == "resume":
            if first:
                await self._resume(frame)
            else:
                await self._send_json({"type": "error", "code": "resume_not_first"})
            return
        if first:
            await self._release()
        if kind == "ping":
            await self._send_json({"type": "pong"})
        else:
            await self._send_json({"type": "error", "code": "unknown_type"})

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(conf.INBOUND_BURST), self.tokens + (now - self.tokens_at) * conf.INBOUND_RATE_PER_SEC)
        self.tokens_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    async def _send_json(self, obj: dict[str, Any]) -> None:
        if not self.closed:
            await self.send(text_data=json.dumps(obj, separators=(",", ":")))

    # --- resume ---------------------------------------------------------------------

    async def _resume(self, frame: dict[str, Any]) -> None:
        wanted = frame.get("streams")
        if not isinstance(wanted, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("epoch"), str)
            and isinstance(v.get("offset"), int)
            and not isinstance(v.get("offset"), bool)
            and v["offset"] >= 0
            for v in wanted.values()
        ):
            await self._send_json({"type": "error", "code": "invalid_resume"})
            await self._release()
            return
        async with self.lock:
            result: dict[str, dict[str, Any]] = {}
            for name, pos in wanted.items():
                result[name] = await self._replay(name, pos["epoch"], pos["offset"])
                if self.closed:
                    return
            await self._send_json({"type": "resumed", "streams": result})
        await self._release()

    async def _replay(self, name: str, epoch: str, offset: int) -> dict[str, Any]:
        head = self.hello_heads.get(name)
        if head is None:
            return {"recovered": False, "reason": "unknown_stream"}
        if epoch != head.epoch:
            return {"recovered": False, "reason": "epoch_changed"}
        if offset > head.offset:
            return {"recovered": False, "reason": "offset_ahead"}
        missing = head.offset - offset
        if offset + 1 < head.first_retained or missing > conf.MAX_REPLAY_EVENTS:
            return {"recovered": False, "reason": "retention_exceeded"}
        items = await database_sync_to_async(outbox.read_range)(self.keys[name], offset, head.offset)
        if len(items) != missing:  # all or nothing: never a partial replay called recovered
            return {"recovered": False, "reason": "retention_exceeded"}
        for item in items:
            await self._send_text(streams.event_frame(name, head.epoch, item))
        return {"recovered": True, "replayed": missing}

    # --- live delivery --------------------------------------------------------------

    async def _hold_timer(self) -> None:
        await asyncio.sleep(conf.LIVE_HOLD_MS / 1000)
        try:
            await self._release()
        except Exception as exc:
            await self._failed(exc)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Dispatch, but never let a handler's error leave a half-alive consumer behind:
        close with 4001 (the peer reconnects and resumes) and let disconnect() clean up."""
        try:
            await super().dispatch(message)
        except StopConsumer:
            raise
        except Exception as exc:
            await self._failed(exc)

    async def _failed(self, exc: BaseException) -> None:
        logger.error("consumer failed (%s): closing 4001", type(exc).__name__, extra={"action": "consumer_error"})
        if getattr(self, "cursors", None):
            await self.close_with(4001)
        else:  # failed before accept
            await self.close()

    async def _release(self) -> None:
        if not self.holding:
            return
        async with self.lock:
            self.holding = False
            held, self.held = self.held, []
            try:
                for batch in held:
                    await self._deliver(*batch)
            except _Closed:
                return

    async def bp_batch(self, message: dict[str, Any]) -> None:
        """A relay's batch for one of this connection's streams."""
        name = streams.audience_of(message["stream"])
        if self.closed or name not in self.cursors or self.keys.get(name) != message["stream"]:
            return
        batch: Batch = (name, message["epoch"], message["items"])
        if self.holding:
            self.held.append(batch)
            return
        async with self.lock:
            try:
                await self._deliver(*batch)
            except _Closed:
                return

    async def _deliver(self, name: str, epoch: str, items: list[list[Any]]) -> None:
        cursor = self.cursors[name]
        if epoch != cursor.epoch:  # the stream was recreated: offsets mean nothing now
            await self.close_with(4409)
            raise _Closed
        frames = {int(o): f for o, f in items}
        for step in cursor.plan(sorted(frames)):
            if isinstance(step, tuple):
                await self._fill(name, cursor.epoch, step[0] - 1, step[1])
            else:
                await self._send_text(frames[step])

    async def _fill(self, name: str, epoch: str, after: int, upto: int) -> None:
        # The cursor has moved past the gap already: if the gap cannot be sent now, the socket
        # must close (4001) so the peer resumes from what it really processed.
        if upto - after > conf.MAX_REPLAY_EVENTS:
            await self.close_with(4001)
            raise _Closed
        try:
            items = await database_sync_to_async(outbox.read_range)(self.keys[name], after, upto)
        except Exception as exc:
            logger.warning("gap fill failed (%s): closing 4001", type(exc).__name__, extra={"action": "gap_error"})
            await self.close_with(4001)
            raise _Closed from None
        if len(items) != upto - after:  # compacted away: the peer must refetch
            logger.warning("gap %s..%s no longer in the outbox", after + 1, upto, extra={"action": "gap_lost"})
            await self.close_with(4409)
            raise _Closed
        logger.info("filled %d missed events from the outbox", len(items), extra={"action": "gap_filled"})
        for item in items:
            await self._send_text(streams.event_frame(name, epoch, item))

    async def _send_text(self, text: str) -> None:
        if self.closed:
            raise _Closed
        await self.send(text_data=text)

    async def observe_heads(self, heads: dict[str, outbox.Head]) -> None:
        """Fill a lag that persists across two head checks (the relay was not just slow)."""
        if self.holding or self.closed:
            return
        try:
            await self._observe_heads(heads)
        except Exception as exc:
            await self._failed(exc)

    async def _observe_heads(self, heads: dict[str, outbox.Head]) -> None:
        for name, key in self.keys.items():
            head = heads.get(key)
            cursor = self.cursors.get(name)
            if head is None or cursor is None:
                continue
            if head.epoch != cursor.epoch:
                await self.close_with(4409)
                return
            seen = self.lag_seen.pop(name, None)
            if seen is not None and cursor.next <= seen:
                async with self.lock:
                    if cursor.next <= seen:
                        target = seen
                        after = cursor.next - 1
                        cursor.next = target + 1
                        try:
                            await self._fill(name, cursor.epoch, after, target)
                        except _Closed:
                            return
            if cursor.next <= head.offset:
                self.lag_seen[name] = head.offset


def _open(consumer: GatewayConsumer, edge_id: str) -> dict[str, outbox.Head]:
    """Read the connection's heads (after it joined its groups) and add its directory row."""
    p = consumer.principal
    heads = outbox.ensure_streams(p.tenant_id, list(consumer.keys.values()))
    expires = timezone.now() + timedelta(seconds=conf.CONNECTION_TTL_SECS)
    try:
        with transaction.atomic():
            Connection.objects.create(edge_id=edge_id, expires_at=expires, **consumer.directory_row())
    except IntegrityError:  # this edge's row was swept (a stalled heartbeat): register again
        from backplane.edge import _register_edge

        _register_edge(edge_id)
        Connection.objects.create(edge_id=edge_id, expires_at=expires, **consumer.directory_row())
    return heads
