"""The edge's Redis receive task takes the messages one read brought in together
(``vendor_redis.install_buffered_receive``, decision 0051): all of them, in order, and fewer
``get_message`` calls than messages; a reply that is no plain message still goes through
redis-py (its subscription state), and an error reply is raised as reading it would be."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
import redis
from django.conf import settings
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio.client import PubSub

from backplane.vendor import channels_redis as vendor_redis

from .helpers import eventually
from .test_edge_pileup import queued, raw_channel_of
from .test_redis_security import KEY_A, make_layer

pytestmark = [pytest.mark.integration]


async def test_buffered_receive__a_burst_arrives_whole_in_order_with_few_get_message_calls(
    services: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from channels_redis.pubsub import RedisSingleShardConnection

    # Installed for this test only: undone after it, with the flag that guards installing twice.
    monkeypatch.setattr(RedisSingleShardConnection, "_do_receiving", RedisSingleShardConnection._do_receiving)
    monkeypatch.setattr(RedisSingleShardConnection, "_tyrum_buffered_receive", False, raising=False)
    from redis._parsers.resp3 import _AsyncRESP3Parser

    for parser_class in (_AsyncHiredisParser, _AsyncRESP3Parser):
        monkeypatch.setattr(parser_class, "handle_pubsub_push_response", parser_class.handle_pubsub_push_response)
    vendor_redis.install_buffered_receive()
    assert RedisSingleShardConnection._do_receiving is vendor_redis._do_receiving
    returned: list[Any] = []
    get_message = PubSub.get_message

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        message = await get_message(self, *args, **kwargs)
        if message is not None:
            returned.append(message)
        return message

    monkeypatch.setattr(PubSub, "get_message", counted)
    layer = make_layer([KEY_A])
    publisher = redis.Redis.from_url(settings.REDIS_URL)
    try:
        channel = await layer.new_channel()
        await layer.group_add("burst", channel)
        target = raw_channel_of(layer, "burst")
        # Published while this loop is blocked: the whole burst waits in the socket for one read.
        pipe = publisher.pipeline(transaction=False)
        for n in range(200):
            pipe.publish(target, layer.serialize({"type": "x", "n": n}))
        assert pipe.execute() == [1] * 200
        await eventually(queued(layer, channel, 200))
        got = vendor_redis.receive_ready(layer, channel, 500)
        assert [m["n"] for m in got] == list(range(200))
        assert len(returned) < 20  # channels-redis's own task: one get_message per message (200)
    finally:
        publisher.close()
        await layer.flush()


class Shard:
    def __init__(self) -> None:
        self.received: list[Any] = []

    def _receive_message(self, message: Any) -> None:
        self.received.append(message)


def pubsub_reading(data: bytes) -> tuple[PubSub, Any]:
    """redis-py's PubSub over a connection whose hiredis parser has read ``data``."""
    from redis.asyncio import Redis

    pubsub = Redis().pubsub()
    parser = _AsyncHiredisParser(65536)
    parser._reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA, replyError=parser.parse_error)
    parser._connected = True
    parser._hiredis_PushNotificationType = hiredis.PushNotification  # as its on_connect sets it
    parser._reader.feed(data)

    class Connection:
        _parser = parser
        disconnects = 0

        def deregister_connect_callback(self, callback: Any) -> None:  # PubSub.__del__
            pass

        async def disconnect(self) -> None:
            Connection.disconnects += 1

    pubsub.connection = Connection()  # type: ignore[assignment]
    return pubsub, parser


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


async def test_buffered_receive__other_replies_go_through_redis_py_and_errors_are_raised() -> None:
    data = (
        resp(b"message", b"a", b"one")
        + resp(b"unsubscribe", b"gone", b"0")
        + resp(b"message", b"a", b"two")
        + b"-ERR something\r\n"
        + resp(b"message", b"a", b"three")
    )
    pubsub, _ = pubsub_reading(data)
    pubsub.channels[b"gone"] = None
    pubsub.pending_unsubscribe_channels.add(b"gone")
    shard = Shard()
    with pytest.raises(redis.ResponseError):
        await vendor_redis._take_buffered(shard, pubsub)
    assert [m and m["data"] for m in shard.received] == [b"one", None, b"two"]  # None: the confirmation
    assert b"gone" not in pubsub.channels and not pubsub.pending_unsubscribe_channels  # redis-py's state kept
    assert await vendor_redis._take_buffered(shard, pubsub) == 1  # the next call goes on after the error
    assert shard.received[-1]["data"] == b"three" and shard.received[-1]["channel"] == b"a"
    assert await vendor_redis._take_buffered(shard, pubsub) == 0  # nothing complete left: no read


async def test_buffered_receive__a_channel_with_a_handler_is_left_to_redis_py() -> None:
    pubsub, _ = pubsub_reading(resp(b"message", b"h", b"payload"))
    handled: list[Any] = []
    pubsub.channels[b"h"] = handled.append
    shard = Shard()
    assert await vendor_redis._take_buffered(shard, pubsub) == 1
    assert [m["data"] for m in handled] == [b"payload"] and shard.received == [None]


async def test_buffered_receive__a_push_not_a_message_goes_through_redis_pys_push_handling() -> None:
    """RESP3: a maintenance notice or an invalidation among the messages is handled as
    ``read_response`` would (``handle_push_response``), not passed off as a message."""
    data = b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$3\r\none\r\n>2\r\n$6\r\nMOVING\r\n:1\r\n"
    pubsub, parser = pubsub_reading(data)
    pushed: list[Any] = []

    async def handle_push_response(response: Any) -> None:
        pushed.append(list(response))
        return None  # consumed, as redis-py's maintenance handlers do

    parser.handle_push_response = handle_push_response
    shard = Shard()
    assert await vendor_redis._take_buffered(shard, pubsub) == 2
    assert [m["data"] for m in shard.received] == [b"one"]  # the message, straight on
    assert pushed == [[b"MOVING", 1]]


async def test_buffered_receive__a_connection_error_reply_disconnects_so_the_next_read_reconnects() -> None:
    pubsub, _ = pubsub_reading(b"-LOADING Redis is loading the dataset in memory\r\n")
    connection: Any = pubsub.connection
    before = connection.disconnects
    with pytest.raises(redis.ConnectionError):  # BusyLoadingError, as read_response raises it
        await vendor_redis._take_buffered(Shard(), pubsub)
    assert connection.disconnects == before + 1


async def test_quiet_push_handling__a_push_message_is_returned_as_is_and_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py's own handler formats every RESP3 pub/sub push, payload included, into a debug
    line on the ``push_response`` logger; the edge's returns it and logs nothing, whatever that
    logger's level."""
    import logging

    from redis._parsers.resp3 import _AsyncRESP3Parser, _RESP3Parser

    for parser_class in (_AsyncHiredisParser, _AsyncRESP3Parser):  # installed for this test only
        monkeypatch.setattr(parser_class, "handle_pubsub_push_response", parser_class.handle_pubsub_push_response)
    message = hiredis.PushNotification([b"message", b"a", b"secret-payload"])
    caplog.set_level(logging.DEBUG, logger="push_response")
    assert _RESP3Parser(65536).handle_pubsub_push_response(message) is message  # redis-py's own, unpatched
    assert "secret-payload" in caplog.text
    caplog.clear()
    vendor_redis.install_quiet_push_handling()
    for parser in (_AsyncHiredisParser(65536), _AsyncRESP3Parser(65536)):
        assert await parser.handle_pubsub_push_response(message) is message
    assert caplog.text == ""
