"""Sealed Redis messages (backplane.sealing, the pub/sub layer's serializer): authenticated,
rotated keys, an age limit — the properties of docs/decisions/0024 with AES-GCM."""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgpack
import pytest

from backplane import sealing
from backplane.conf import MESSAGE_MAX_AGE_SECS, channel_layers
from backplane.vendor import channels_redis as vendor_redis

KEY_OLD = "sealing-test-key-old-0123456789abcdefghijkl"
KEY_NEW = "sealing-test-key-new-0123456789abcdefghijkl"
MESSAGE = {"type": "bp.batch", "stream": "d:x:dev-1", "epoch": "e1", "items": [[1, '{"type":"event"}']]}


def layer(keys: list[str]) -> Any:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    config = channel_layers("redis://127.0.0.1:6379", prefix="seal", keys=keys)["default"]["CONFIG"]
    return RedisPubSubChannelLayer(**config)


def test_sealed__opens_with_any_listed_key_and_hides_the_message() -> None:
    token = layer([KEY_NEW, KEY_OLD]).serialize(MESSAGE)
    assert sealing.is_sealed(token)
    assert b"bp.batch" not in token and b"event" not in token
    assert layer([KEY_OLD, KEY_NEW]).deserialize(token) == MESSAGE
    assert layer([KEY_NEW]).deserialize(token) == MESSAGE
    with pytest.raises(vendor_redis.UNREADABLE):  # the sealing key is not listed
        layer([KEY_OLD]).deserialize(token)


@pytest.mark.parametrize("where", [0, 1, 5, 13, 20, 30, -1])
def test_sealed__any_altered_byte_does_not_open(where: int) -> None:
    token = bytearray(layer([KEY_NEW]).serialize(MESSAGE))
    token[where] ^= 0x01
    with pytest.raises(vendor_redis.UNREADABLE):
        layer([KEY_NEW]).deserialize(bytes(token))


def test_sealed__header_time_moved_or_truncated_does_not_open() -> None:
    sealer = sealing.Sealer([KEY_NEW], MESSAGE_MAX_AGE_SECS)
    token = sealer.seal(b"data")
    version, kid, at = sealing.HEADER.unpack(token[: sealing.HEADER.size])
    forged = sealing.HEADER.pack(version, kid, at + 5) + token[sealing.HEADER.size :]  # a replay made "fresh"
    with pytest.raises(sealing.InvalidToken):
        sealer.open(forged)
    with pytest.raises(sealing.InvalidToken):
        sealer.open(token[: sealing.OVERHEAD - 1])


def test_sealed__refused_past_the_max_age_and_from_the_future() -> None:
    sealer = sealing.Sealer([KEY_NEW], MESSAGE_MAX_AGE_SECS)
    now = time.time()
    assert sealer.open(sealer.seal(b"ok", now=now - MESSAGE_MAX_AGE_SECS + 1)) == b"ok"
    with pytest.raises(sealing.InvalidToken):
        sealer.open(sealer.seal(b"late", now=now - MESSAGE_MAX_AGE_SECS - 2))
    with pytest.raises(sealing.InvalidToken):
        sealer.open(sealer.seal(b"early", now=now + sealing.CLOCK_SKEW_SECS + 2))
    # The pub/sub layer's serializer applies the configured age.
    serializer = layer([KEY_NEW])._serializer
    old = serializer.sealer.seal(msgpack.packb(MESSAGE), now=now - MESSAGE_MAX_AGE_SECS - 2)
    with pytest.raises(vendor_redis.UNREADABLE):
        layer([KEY_NEW]).deserialize(old)


def test_sealed__nonces_never_repeat_under_one_key_even_when_the_counter_wraps() -> None:
    sealer = sealing.Sealer([KEY_NEW], MESSAGE_MAX_AGE_SECS)
    nonce = slice(sealing.HEADER.size, sealing.HEADER.size + sealing.NONCE_BYTES)
    seen = {sealer.seal(b"x")[nonce] for _ in range(1000)}
    assert len(seen) == 1000
    prefix = sealer.prefix
    sealer.counter = itertools.count(1 << 32)  # the counter is spent: a new random prefix
    wrapped = sealer.seal(b"x")[nonce]
    assert wrapped[:8] == sealer.prefix != prefix and wrapped[8:] == bytes(4)
    assert len(layer([KEY_NEW]).deserialize(layer([KEY_NEW]).serialize(MESSAGE))) == len(MESSAGE)


def test_sealed__plaintext_and_garbage_do_not_open_on_a_keyed_layer() -> None:
    with pytest.raises(vendor_redis.UNREADABLE):
        layer([KEY_NEW]).deserialize(msgpack.packb(MESSAGE))
    with pytest.raises(vendor_redis.UNREADABLE):
        layer([KEY_NEW]).deserialize(b"\x01" + b"\x00" * 60)


def test_sealed__fernet_tokens_of_earlier_relays_still_open_within_the_age() -> None:
    """A cluster being upgraded: edges read relays that still send Fernet tokens."""
    from channels_redis.serializers import MsgPackSerializer

    crypter = MsgPackSerializer(symmetric_encryption_keys=[KEY_NEW]).crypter
    data = msgpack.packb(MESSAGE)
    assert layer([KEY_NEW]).deserialize(crypter.encrypt(data)) == MESSAGE
    with pytest.raises(vendor_redis.UNREADABLE):
        layer([KEY_NEW]).deserialize(crypter.encrypt_at_time(data, int(time.time()) - MESSAGE_MAX_AGE_SECS - 60))


def test_sealed__smaller_than_fernet() -> None:
    from channels_redis.serializers import MsgPackSerializer

    fernet = MsgPackSerializer(symmetric_encryption_keys=[KEY_NEW]).serialize(MESSAGE)
    assert len(layer([KEY_NEW]).serialize(MESSAGE)) == len(msgpack.packb(MESSAGE)) + sealing.OVERHEAD < len(fernet)
