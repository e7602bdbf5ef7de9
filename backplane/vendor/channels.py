"""channels behaviour the edge relies on beyond its documented API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A consumer whose ``channel_layer_alias`` names no configured layer gets no layer and no
# channel of its own (``get_channel_layer`` answers None for an unknown alias): the edge
# runtime's one subscription per stream hands batches to its sockets instead.
NO_LAYER_ALIAS = "tyrum.edge-runtime"

# channels' dispatch turns a message type into a handler name with this.
from channels.consumer import get_handler_name  # noqa: E402

__all__ = ["NO_LAYER_ALIAS", "get_handler_name", "group_add_many"]


async def group_add_many(layer: Any, groups: Sequence[str], channel: str) -> None:
    """``layer.group_add(group, channel)`` for each of ``groups``. On channels-redis's pub/sub
    layer, one SUBSCRIBE per shard for them all (its own group_add takes the shard's lock and
    writes one command per group: in a connect storm every new device stream is a group);
    other layers are asked one group at a time."""
    inner = _pubsub_loop_layer(layer)
    if inner is None:
        for group in groups:
            await layer.group_add(group, channel)
        return
    if channel not in inner.channels:  # as group_add refuses
        raise RuntimeError(f"group_add_many() on channel {channel!r}, which does not exist in this process")
    by_shard: dict[int, tuple[Any, list[str]]] = {}
    for group in groups:
        group_channel = inner._get_group_channel_name(group)
        inner.groups.setdefault(group_channel, set()).add(channel)
        shard = inner._get_shard(group_channel)
        by_shard.setdefault(id(shard), (shard, []))[1].append(group_channel)
    for shard, group_channels in by_shard.values():
        async with shard._lock:  # what RedisSingleShardConnection.subscribe does, for many
            new = [c for c in dict.fromkeys(group_channels) if c not in shard._subscribed_to]
            if new:
                shard._ensure_redis()
                shard._ensure_receiver()
                await shard._pubsub.subscribe(*new)
                shard._subscribed_to.update(new)


def _pubsub_loop_layer(layer: Any) -> Any:
    """The running loop's channels-redis pub/sub layer behind ``layer``, or None for any other
    layer (or a channels-redis whose internals are not the ones ``group_add_many`` knows)."""
    try:
        from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
    except ImportError:
        return None
    if not isinstance(layer, RedisPubSubChannelLayer):
        return None
    inner = layer._get_layer()
    if not isinstance(inner, RedisPubSubLoopLayer) or not all(
        hasattr(inner, name) for name in ("channels", "groups", "_get_group_channel_name", "_get_shard")
    ):
        return None
    if not all(hasattr(RedisSingleShardConnection, m) for m in ("_ensure_redis", "_ensure_receiver")):
        return None
    return inner
