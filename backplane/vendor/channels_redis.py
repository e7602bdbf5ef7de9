"""channels-redis internals the backplane relies on.

- The relay publishes many group messages of the pub/sub layer in one pipelined round trip
  (docs/decisions/0014-relay-pipelined-group-sends.md).
- Encryption: the pub/sub layer hands ``symmetric_encryption_keys`` to its serializer (its
  own, Fernet, has no ``expiry`` there, so it would accept a recorded message forever);
  ``register_serializer`` registers one that seals with AES-GCM (``backplane.sealing``) and
  refuses old messages.
  The pub/sub layer deserializes in ``receive`` (its reader task only queues raw bytes), so a
  message it cannot decrypt raises one of ``UNREADABLE`` there, in the receiver, and the
  reader and the next messages are unaffected.
- The receive task (``install_buffered_receive``): the messages that one read from Redis
  brought in together are handed on as they are parsed, not each through redis-py's
  ``get_message`` (docs/decisions/0051-edge-takes-buffered-messages-together.md).

The layer's own ``group_send`` takes a lock and a round trip per message; a relay cycle with
hundreds of device streams would pay hundreds of sequential round trips. ``PubSubPublisher``
writes exactly what ``group_send`` writes — the same channel names (``_get_group_channel_name``
of the loop's layer), the same serializer (``serialize``) — in one pipeline. ``WirePublisher``
(the one ``for_layer`` gives for TCP and Unix URLs) writes the same PUBLISH commands itself on
a connection of its own and reads the replies with hiredis: redis-py's pipeline costs ~8 µs of
Python per command (docs/decisions/0039-relay-publish-on-its-own-wire.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Any

from cryptography.fernet import InvalidToken
from msgpack import UnpackException  # type: ignore[import-untyped]  # msgpack ships no types
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser  # imported once: read per message
from redis.exceptions import ConnectionError as RedisConnectionError

# What is read of the layer: the wrapper's per-loop layer, its shards (one host only: a
# sharded layer publishes each group on its own host), its group channel names, its serializer.
RELIED_ON = (
    ("channels_redis.pubsub", "RedisPubSubChannelLayer", "_get_layer"),
    ("channels_redis.pubsub", "RedisPubSubChannelLayer", "deserialize"),
    ("channels_redis.serializers", "MsgPackSerializer", "deserialize"),
    ("channels_redis.serializers", "SerializersRegistry", "register_serializer"),
    ("channels_redis.pubsub", "RedisPubSubChannelLayer", "serialize"),
    ("channels_redis.pubsub", "RedisPubSubLoopLayer", "_get_group_channel_name"),
    # ``receive_ready``: the per-loop layer's queues of raw messages, by channel, and its
    # ``receive``, which takes one off such a queue and deserializes it with the wrapper's.
    ("channels_redis.pubsub", "RedisPubSubLoopLayer", "receive"),
    # ``install_buffered_receive``: the shard's receive task, what it hands each message to, and
    # redis-py's handling of a reply that is not a plain message (subscriptions' state).
    ("channels_redis.pubsub", "RedisSingleShardConnection", "_do_receiving"),
    ("channels_redis.pubsub", "RedisSingleShardConnection", "_receive_message"),
    ("redis.asyncio.client", "PubSub", "get_message"),
    ("redis.asyncio.client", "PubSub", "handle_message"),
    ("redis._parsers.hiredis", "_AsyncHiredisParser", "read_response"),
    # ``install_quiet_push_handling``: what each RESP3 pub/sub push goes through.
    ("redis._parsers.hiredis", "_AsyncHiredisParser", "handle_pubsub_push_response"),
    ("redis._parsers.resp3", "_AsyncRESP3Parser", "handle_pubsub_push_response"),
)

logger = logging.getLogger(__name__)

# Replies taken per get_message at most (a read is 64 KiB); the rest wait for the next call.
BUFFERED_REPLIES_MAX = 4096


# What ``receive`` raises for a message that is not one of ours: a token that another key
# made, that was altered or is too old (InvalidToken), or bytes that are no message at all
# (msgpack's errors: ValueErrors, but OutOfData).
UNREADABLE: tuple[type[Exception], ...] = (InvalidToken, UnpackException, ValueError)

SERIALIZER_FORMAT = "tyrum-msgpack"


def register_serializer(max_age_secs: int) -> str:
    """Register the pub/sub layer's serializer: msgpack sealed with AES-256-GCM
    (``backplane.sealing``; docs/decisions/0029-relay-to-peer-hop.md), refusing messages sealed
    more than ``max_age_secs`` ago. It still opens Fernet tokens (channels-redis's own
    encryption, with the same keys, refused past ``max_age_secs`` plus channels-redis's 10 s),
    so the edges of a cluster being upgraded read the relays not upgraded yet. Return its
    format name for the layer's ``serializer_format``."""
    import msgpack
    from channels_redis.serializers import MsgPackSerializer, registry

    from backplane.sealing import Sealer, is_sealed

    packb, unpackb = msgpack.packb, msgpack.unpackb

    class SealedSerializer(MsgPackSerializer):  # type: ignore[misc]
        def __init__(
            self, *args: Any, expiry: int | None = None, symmetric_encryption_keys: Any = None, **kwargs: Any
        ) -> None:
            expiry = max_age_secs if expiry is None else expiry
            super().__init__(*args, expiry=expiry, symmetric_encryption_keys=symmetric_encryption_keys, **kwargs)
            self.sealer = Sealer(symmetric_encryption_keys, expiry) if symmetric_encryption_keys else None

        def serialize(self, message: Any) -> bytes:
            if self.sealer is None:
                return bytes(packb(message))
            return self.sealer.seal(packb(message))

        def deserialize(self, message: bytes) -> Any:
            if self.sealer is not None and is_sealed(message):
                return unpackb(self.sealer.open(message))
            return super().deserialize(message)  # Fernet (or, without keys, plain msgpack)

    registry.register_serializer(SERIALIZER_FORMAT, SealedSerializer)
    return SERIALIZER_FORMAT


def receive_ready(layer: Any, channel: str, limit: int) -> list[Any]:
    """The messages for ``channel`` that the pub/sub layer's reader task has already queued,
    at most ``limit``, taken without waiting: what the next ``receive`` calls would return at
    once, in the same order. Each is deserialized (as ``receive`` does), or is the exception its
    deserializing raised (one of ``UNREADABLE`` for a message not ours). ``[]`` for any other
    layer, or none queued.

    The edge delivers what has piled up behind a message together
    (docs/decisions/0046-edge-delivers-what-piled-up-together.md)."""
    if type(layer).__name__ != "RedisPubSubChannelLayer":
        return []
    queue = layer._get_layer().channels.get(channel)
    if queue is None:
        return []
    taken: list[Any] = []
    deserialize = layer.deserialize
    while len(taken) < limit and not queue.empty():
        raw = queue.get_nowait()
        try:
            taken.append(deserialize(raw))
        except Exception as exc:  # the receiver's to handle, as ``receive`` would have raised it
            taken.append(exc)
    return taken


def install_buffered_receive() -> None:
    """channels-redis's receive task takes each message from redis-py's ``PubSub.get_message``,
    which pays per message for a health check, a retry wrapper, a timeout, observability hooks
    and (RESP3) a debug line formatted from the whole message: most of an edge's CPU for the
    Redis side at high device rates. One read from the socket usually brings many messages (the
    relay publishes a cycle's batches in one write). Here, after each ``get_message``, the
    replies the parser already holds complete are taken straight from hiredis's reader, in
    order: a message of a channel without a handler goes to ``_receive_message`` as
    ``get_message`` would have returned it; anything else (a subscription's confirmation, a
    pong, a handler's channel; a RESP3 push that is no message, through the parser's push
    handling first) goes through redis-py's own ``handle_message``; an error reply is raised,
    as reading it would have (one redis-py reads as a lost connection disconnects first, so
    the next read reconnects and subscribes again). Only what was already read is taken: no I/O, so the
    reconnects and timeouts of ``get_message`` still govern every read. Without hiredis the task
    is channels-redis's own."""
    from channels_redis.pubsub import RedisSingleShardConnection

    if getattr(RedisSingleShardConnection, "_tyrum_buffered_receive", False):
        return
    RedisSingleShardConnection._tyrum_buffered_receive = True
    RedisSingleShardConnection._do_receiving = _do_receiving
    install_quiet_push_handling()


def install_quiet_push_handling() -> None:
    """redis-py's asynchronous parsers (hiredis's and its own RESP3 one) hand every RESP3 pub/sub
    push to ``handle_pubsub_push_response``, which builds ``"Push response: " + str(response)``
    — the whole message, payload included — for a debug line on the ``push_response`` logger:
    CPU for every message, and the payload in the log of anyone who turns that logger on. The
    edge's handler returns the message as that one does, and formats and logs nothing."""
    from redis._parsers.resp3 import _AsyncRESP3Parser

    for parser in (_AsyncHiredisParser, _AsyncRESP3Parser):
        parser.handle_pubsub_push_response = _pubsub_push_as_is  # type: ignore[method-assign]


async def _pubsub_push_as_is(self: Any, response: Any) -> Any:
    return response


async def _do_receiving(self: Any) -> None:
    """``RedisSingleShardConnection._do_receiving``, taking buffered replies together."""
    while True:
        try:
            pubsub = self._pubsub
            if pubsub and pubsub.subscribed:
                self._receive_message(await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1))
                await _take_buffered(self, pubsub)
            else:
                await asyncio.sleep(0.1)
        except (asyncio.CancelledError, TimeoutError, GeneratorExit):
            raise
        except BaseException:  # as channels-redis's task: log, pause, go on
            logger.exception("Unexpected exception in receive task")
            await asyncio.sleep(1)


async def _take_buffered(shard: Any, pubsub: Any) -> int:
    """Hand on the replies already parsed on ``pubsub``'s connection; return how many."""
    parser: Any = getattr(pubsub.connection, "_parser", None)
    reader: Any = parser._reader if type(parser) is _AsyncHiredisParser and parser._connected else None
    if reader is None:
        return 0
    gets, handlers, receive = reader.gets, pubsub.channels, shard._receive_message
    push = parser._hiredis_PushNotificationType  # RESP3's push replies (None before hiredis 3.2)
    taken = 0
    while taken < BUFFERED_REPLIES_MAX:
        reply = gets()
        if reply is NOT_ENOUGH_DATA:
            break
        taken += 1
        if isinstance(reply, BaseException):  # an error reply, or hiredis's protocol error
            if isinstance(reply, RedisConnectionError):  # as read_response's: reconnect first
                await pubsub.connection.disconnect()
            raise reply
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message" and handlers.get(reply[1]) is None:
            receive({"type": "message", "pattern": None, "channel": reply[1], "data": reply[2]})
            continue
        if push is not None and isinstance(reply, push):  # a maintenance notice, an invalidation
            reply = await parser.handle_push_response(reply)
        if reply:  # what get_message hands on
            receive(await pubsub.handle_message(reply, ignore_subscribe_messages=True))
    return taken


class PubSubPublisher:
    """Publish many group messages of one single-host pub/sub layer in one pipeline."""

    def __init__(self, layer: Any, loop_layer: Any, redis_url: str, timeout: float) -> None:
        import redis.asyncio as aredis

        self.layer = layer
        self.loop_layer = loop_layer
        self.client = aredis.Redis.from_url(redis_url, socket_connect_timeout=timeout, socket_timeout=timeout)

    @classmethod
    def for_layer(cls, layer: Any, redis_url: str, timeout: float) -> PubSubPublisher | None:
        """A publisher for a single-host pub/sub layer; None for any other layer."""
        if type(layer).__name__ != "RedisPubSubChannelLayer" or not redis_url:
            return None
        loop_layer = layer._get_layer()
        if len(loop_layer._shards) != 1:
            return None
        if cls is PubSubPublisher and _plain(redis_url):
            return WirePublisher(layer, loop_layer, redis_url, timeout)
        return cls(layer, loop_layer, redis_url, timeout)

    async def publish_all(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Publish every (group, message); return how many subscribers each reached."""
        pipe = self.client.pipeline(transaction=False)
        for group, message in messages:
            pipe.publish(self.loop_layer._get_group_channel_name(group), self.layer.serialize(message))
        return [int(n) for n in await pipe.execute()]

    async def aclose(self) -> None:
        await self.client.aclose()


def _plain(redis_url: str) -> bool:
    """Whether ``redis_url`` is TCP or a Unix socket (``WirePublisher`` does not speak TLS)."""
    from redis.connection import UnixDomainSocketConnection, parse_url

    return parse_url(redis_url).get("connection_class") in (None, UnixDomainSocketConnection)  # type: ignore[no-untyped-call]


def _publish_command(channel: bytes, data: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(data), data)


class _Replies(asyncio.Protocol):
    """The reply side of a ``WirePublisher``'s connection: each waiter takes its count of
    replies, in order. A waiter given up on (timed out) still takes its replies, so the next
    one gets its own."""

    def __init__(self) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[tuple[asyncio.Future[list[Any]], int, list[Any]]] = collections.deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.waiting:
            future, count, got = self.waiting[0]
            while len(got) < count:
                reply = self.reader.gets()
                if reply is False:
                    return
                got.append(reply)
            self.waiting.popleft()
            if not future.done():
                future.set_result(got)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(ConnectionResetError("Redis closed the publisher's connection"))


class WirePublisher(PubSubPublisher):
    """``PubSubPublisher`` on a connection of its own: the PUBLISH commands of a call go out
    in one write, their integer replies are parsed by hiredis. The connection (opened,
    authenticated and named as the doorbell's, ``doorbell._open``, in a thread) is dropped
    on any failure or when a call is given up on, and opened again by the next call."""

    def __init__(self, layer: Any, loop_layer: Any, redis_url: str, timeout: float) -> None:
        self.layer = layer
        self.loop_layer = loop_layer
        self.redis_url = redis_url
        self.timeout = timeout
        self._replies: _Replies | None = None
        self._channels: dict[str, bytes] = {}  # group → its channel's name, encoded

    async def _connection(self) -> _Replies:
        replies = self._replies
        if replies is not None and not replies.lost:
            return replies
        from backplane.doorbell import _open

        loop = asyncio.get_running_loop()
        sock = await asyncio.wait_for(loop.run_in_executor(None, _open, self.redis_url, "relay"), self.timeout)
        try:
            _, replies = await loop.create_connection(_Replies, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._replies = replies
        return replies

    async def publish_all(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        if not messages:
            return []
        replies = await self._connection()
        channels, serialize = self._channels, self.layer.serialize
        if len(channels) > 100_000:  # groups come and go: bounded
            channels.clear()
        out = []
        for group, message in messages:
            channel = channels.get(group)
            if channel is None:
                channel = channels[group] = self.loop_layer._get_group_channel_name(group).encode()
            out.append(_publish_command(channel, serialize(message)))
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        replies.waiting.append((future, len(messages), []))
        assert replies.transport is not None
        try:
            replies.transport.write(b"".join(out))
            got = await future
        except BaseException:
            self._drop(replies)  # given up on (timeout, cancel) or lost: the next call starts afresh
            raise
        for reply in got:
            if isinstance(reply, Exception):  # an error reply (hiredis.ReplyError)
                from redis.exceptions import ResponseError

                raise ResponseError(str(reply))
        return [int(n) for n in got]

    def _drop(self, replies: _Replies) -> None:
        """Abort the connection a failed call used (not one another call opened since)."""
        if replies.transport is not None:
            replies.transport.abort()
        if self._replies is replies:
            self._replies = None

    async def aclose(self) -> None:
        if self._replies is not None and self._replies.transport is not None:
            self._replies.transport.close()
        self._replies = None
