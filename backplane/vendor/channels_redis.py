"""channels-redis internals the backplane relies on.

- The relay publishes many group messages of the pub/sub layer in one pipelined round trip
  (docs/decisions/0014-relay-pipelined-group-sends.md).
- Encryption: the pub/sub layer's serializer takes ``symmetric_encryption_keys`` (Fernet,
  ``MultiFernet``: the first key encrypts, all decrypt) but no ``expiry``, so it would accept
  a recorded message forever; ``register_serializer`` registers one that refuses old ones.
  The pub/sub layer deserializes in ``receive`` (its reader task only queues raw bytes), so a
  message it cannot decrypt raises one of ``UNREADABLE`` there, in the receiver, and the
  reader and the next messages are unaffected.

The layer's own ``group_send`` takes a lock and a round trip per message; a relay cycle with
hundreds of device streams would pay hundreds of sequential round trips. ``PubSubPublisher``
writes exactly what ``group_send`` writes — the same channel names (``_get_group_channel_name``
of the loop's layer), the same serializer (``serialize``) — in one pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.fernet import InvalidToken
from msgpack import UnpackException  # type: ignore[import-untyped]  # msgpack ships no types

# What is read of the layer: the wrapper's per-loop layer, its shards (one host only: a
# sharded layer publishes each group on its own host), its group channel names, its serializer.
RELIED_ON = (
    ("channels_redis.pubsub", "RedisPubSubChannelLayer", "_get_layer"),
    ("channels_redis.pubsub", "RedisPubSubChannelLayer", "deserialize"),
    ("channels_redis.serializers", "MsgPackSerializer", "deserialize"),
    ("channels_redis.serializers", "SerializersRegistry", "register_serializer"),
    ("channels_redis.pubsub", "RedisPubSubChannelLayer", "serialize"),
    ("channels_redis.pubsub", "RedisPubSubLoopLayer", "_get_group_channel_name"),
)


# What ``receive`` raises for a message that is not one of ours: a token that another key
# made, that was altered or is too old (InvalidToken), or bytes that are no message at all
# (msgpack's errors: ValueErrors, but OutOfData).
UNREADABLE: tuple[type[Exception], ...] = (InvalidToken, UnpackException, ValueError)

SERIALIZER_FORMAT = "tyrum-msgpack"


def register_serializer(max_age_secs: int) -> str:
    """Register the pub/sub layer's serializer that refuses messages older than
    ``max_age_secs`` (plus channels-redis's 10 s); return its format name for the layer's
    ``serializer_format``."""
    from channels_redis.serializers import MsgPackSerializer, registry

    class BoundedAgeSerializer(MsgPackSerializer):  # type: ignore[misc]
        def __init__(self, *args: Any, expiry: int | None = None, **kwargs: Any) -> None:
            super().__init__(*args, expiry=max_age_secs if expiry is None else expiry, **kwargs)

    registry.register_serializer(SERIALIZER_FORMAT, BoundedAgeSerializer)
    return SERIALIZER_FORMAT


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
        return cls(layer, loop_layer, redis_url, timeout)

    async def publish_all(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> list[int]:
        """Publish every (group, message); return how many subscribers each reached."""
        pipe = self.client.pipeline(transaction=False)
        for group, message in messages:
            pipe.publish(self.loop_layer._get_group_channel_name(group), self.layer.serialize(message))
        return [int(n) for n in await pipe.execute()]

    async def aclose(self) -> None:
        await self.client.aclose()
