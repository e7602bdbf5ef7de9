"""Redis is not trusted (issue 13, point 1): anyone who reaches it can publish on any channel.

Forged ``bp.batch`` and ``drain`` messages published raw on the real Redis — plaintext, made
with another key, or a genuine message replayed late — reach no socket and drain no edge;
the edge counts them, logs them at most once per interval, and goes on serving the genuine
messages behind them at once. A relay that encrypts with a new key while its edges list old
and new still delivers (rotation). A Redis layer without keys fails ``manage.py check``
unless the Redis network is declared trusted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
import pytest
import redis.asyncio as aredis
from channels_redis.pubsub import RedisPubSubChannelLayer
from channels_redis.serializers import MsgPackSerializer
from django.conf import settings
from django.test import override_settings

from backplane import auth, checks, outbox, streams
from backplane.conf import MESSAGE_MAX_AGE_SECS, channel_layers, conf
from backplane.edge import EdgeRuntime
from backplane.protocol import Close
from backplane.relay import Relay
from backplane.sealing import Sealer, is_sealed

from .helpers import TIMEOUT, eventually, orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

KEY_A = "tyrum-security-test-key-a-0123456789abcdef"
KEY_B = "tyrum-security-test-key-b-0123456789abcdef"
KEY_OTHER = "someone-elses-key-0123456789abcdefghijklmn"


def make_layer(keys: Sequence[str]) -> Any:
    config = channel_layers(settings.REDIS_URL, prefix=conf.channel_prefix, keys=keys)["default"]["CONFIG"]
    return RedisPubSubChannelLayer(**config)


def sealed_token(message: dict[str, Any], key: str, *, at: float | None = None) -> bytes:
    """``message`` as the backplane's layers seal it (AES-GCM) with ``key`` at ``at``."""
    return Sealer([key], MESSAGE_MAX_AGE_SECS).seal(msgpack.packb(message), now=at)


def fernet_token(message: dict[str, Any], key: str, *, at: float | None = None) -> bytes:
    """``message`` as channels-redis encrypts it with ``key`` (sent at ``at``, default now)."""
    crypter = MsgPackSerializer(symmetric_encryption_keys=[key]).crypter
    data = msgpack.packb(message)
    return crypter.encrypt_at_time(data, int(at)) if at is not None else crypter.encrypt(data)


class Socket:
    """A ``Subscriber`` that records what the runtime hands it."""

    def __init__(self, tenant_id: Any, device: str) -> None:
        self.connection_id = f"sock-{device}"
        self.principal = auth.Principal(
            tenant_id=tenant_id, device_id=device, role="client", token_id=None, expires_at=None
        )
        self.keys = {"device": streams.device_stream(tenant_id, device)}
        self.offered: list[tuple[str, list[int], list[str]]] = []
        self.closed: list[int] = []

    async def offer(self, key: str, name: str, epoch: str, items: Any, offsets: Sequence[int], wire: Any) -> None:
        self.offered.append((key, list(offsets), [json.loads(frame)["event"]["payload"]["n"] for _, frame in items]))

    async def observe_heads(self, heads: dict[str, Any]) -> None:
        return None

    async def close_with(self, code: int) -> None:
        self.closed.append(code)

    def directory_row(self) -> dict[str, Any]:
        return {}


@pytest.fixture
async def edge_of(services: None) -> AsyncIterator[Any]:
    """Start edge runtimes on layers of their own (delivery and command loops only)."""
    made: list[tuple[EdgeRuntime, Any]] = []
    sigterm = signal.getsignal(signal.SIGTERM)

    async def start(edge_id: str, keys: Sequence[str]) -> EdgeRuntime:
        layer = make_layer(keys)
        runtime = EdgeRuntime(edge_id, layer=layer)
        runtime.channel = await layer.new_channel()
        await layer.group_add(streams.edge_group(conf.channel_prefix, edge_id), runtime.channel)
        runtime.stream_channel = await layer.new_channel()
        runtime.tasks = [asyncio.create_task(runtime._batches()), asyncio.create_task(runtime._commands())]
        made.append((runtime, layer))
        return runtime

    yield start
    for runtime, layer in made:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await layer.flush()
    signal.signal(signal.SIGTERM, sigterm)


@pytest.fixture
async def raw_redis(services: None) -> AsyncIterator[Any]:
    client = aredis.Redis.from_url(settings.REDIS_URL)
    yield client
    await client.aclose()


async def subscribers(client: Any, channel: str) -> int:
    counts = await client.pubsub_numsub(channel)
    return int(counts[0][1])


def raw_channel(runtime: EdgeRuntime, group: str) -> str:
    """The Redis channel channels-redis publishes ``group`` on."""
    return str(runtime.layer._get_layer()._get_group_channel_name(group))


async def relay_send(relay: Relay) -> None:
    await relay.cycle()
    await relay.flush_marks()


@pytest.fixture
async def relay_of() -> AsyncIterator[Any]:
    made: list[tuple[Relay, Any]] = []

    def make(keys: Sequence[str]) -> Relay:
        layer = make_layer(keys)
        relay = Relay(layer)
        made.append((relay, layer))
        return relay

    yield make
    for relay, layer in made:
        await relay.aclose()
        await layer.flush()


async def test_edge__forged_batches_reach_no_socket_and_the_real_event_at_their_offset_does(
    tenant_factory, edge_of, relay_of, raw_redis, caplog
):
    tenant = await orm(tenant_factory, "forged")
    runtime = await edge_of("edge-forged", [KEY_A])
    sock = Socket(tenant.id, "dev-1")
    await runtime.subscribe(sock)
    key = sock.keys["device"]
    channel = raw_channel(runtime, streams.group_name(conf.channel_prefix, key))
    await eventually(lambda: subscribers(raw_redis, channel))

    forged = {
        "type": "bp.batch",
        "stream": key,
        "epoch": "00000000",
        "items": [[1, json.dumps({"event": {"payload": {"n": -1}}})]],
    }
    caplog.set_level(logging.WARNING, logger="backplane.edge")
    await raw_redis.publish(channel, msgpack.packb(forged))  # plaintext
    await raw_redis.publish(channel, fernet_token(forged, KEY_OTHER))  # another deployment's key
    await raw_redis.publish(channel, fernet_token(forged, KEY_A, at=time.time() - 600))  # a late replay
    await raw_redis.publish(channel, b"\x00not a message at all")
    await raw_redis.publish(channel, sealed_token(forged, KEY_OTHER))  # sealed, another deployment's key
    await raw_redis.publish(channel, sealed_token(forged, KEY_A, at=time.time() - 600))  # sealed, replayed late

    relay = relay_of([KEY_A])
    await orm(lambda: outbox.publish(tenant, "run.updated", {"n": 1}, device="dev-1"))
    await relay_send(relay)  # published after the forgeries, on the same channel: arrives after them
    await eventually(lambda: asyncio.sleep(0, any(1 in ns for _, _, ns in sock.offered)))
    assert sock.offered == [(key, [1], [1])]  # the genuine event at offset 1, and nothing forged
    rejected = [r for r in caplog.records if getattr(r, "action", "") == "redis_message_rejected"]
    assert len(rejected) == 1  # six rejections, one log line (rate-limited)
    assert runtime.rejected == 6


async def test_edge__forged_drain_leaves_the_edge_serving_and_a_genuine_command_still_works(
    tenant_factory, edge_of, raw_redis
):
    tenant = await orm(tenant_factory, "undrained")
    runtime = await edge_of("edge-undrained", [KEY_A])
    sock = Socket(tenant.id, "dev-1")
    runtime.add(sock)
    group = streams.edge_group(conf.channel_prefix, "edge-undrained")
    channel = raw_channel(runtime, group)
    await eventually(lambda: subscribers(raw_redis, channel))

    drain = {"type": "bp.command", "body": json.dumps({"command": "drain", "tenant_id": str(tenant.id)})}
    await raw_redis.publish(channel, msgpack.packb(drain))
    await raw_redis.publish(channel, fernet_token(drain, KEY_OTHER))
    await raw_redis.publish(channel, fernet_token(drain, KEY_A, at=time.time() - 600))
    # A genuine command for another edge, recorded on its channel and replayed on this one.
    await raw_redis.publish(channel, fernet_token({**drain, "edge": "edge-elsewhere"}, KEY_A))
    await eventually(lambda: asyncio.sleep(0, runtime.rejected == 4))
    assert not runtime.draining
    assert sock.closed == []

    # The command loop is not held up by what it rejected: a genuine command goes through at once.
    resync = {
        "type": "bp.command",
        "edge": "edge-undrained",
        "body": json.dumps({"command": "resync", "tenant_id": str(tenant.id)}),
    }
    started = time.monotonic()
    await raw_redis.publish(channel, fernet_token(resync, KEY_A))
    await eventually(lambda: asyncio.sleep(0, sock.closed))
    assert sock.closed == [Close.RESYNC]
    assert time.monotonic() - started < TIMEOUT
    assert not runtime.draining


async def test_relay__rotated_key_still_reaches_edges_that_list_both(tenant_factory, edge_of, relay_of, raw_redis):
    tenant = await orm(tenant_factory, "rotation")
    old_edge = await edge_of("edge-rotation", [KEY_A, KEY_B])  # edges list old and new first
    sock = Socket(tenant.id, "dev-1")
    await old_edge.subscribe(sock)
    channel = raw_channel(old_edge, streams.group_name(conf.channel_prefix, sock.keys["device"]))
    await eventually(lambda: subscribers(raw_redis, channel))

    await orm(lambda: outbox.publish(tenant, "run.updated", {"n": 1}, device="dev-1"))
    before = relay_of([KEY_A, KEY_B])  # a relay not rotated yet: encrypts with A
    await relay_send(before)
    await before.aclose()  # its shards go to the rotated relay
    await orm(lambda: outbox.publish(tenant, "run.updated", {"n": 2}, device="dev-1"))
    await relay_send(relay_of([KEY_B, KEY_A]))  # a rotated relay: encrypts with B
    # Both events, in one offer or two (queued together, they are joined: decision 0046).
    await eventually(lambda: asyncio.sleep(0, sum(len(ns) for _, _, ns in sock.offered) == 2))
    assert [n for _, _, ns in sock.offered for n in ns] == [1, 2]
    assert old_edge.rejected == 0


async def test_relay__edge_without_the_relays_key_rejects_its_batches(tenant_factory, edge_of, relay_of, raw_redis):
    tenant = await orm(tenant_factory, "wrongkey")
    runtime = await edge_of("edge-wrongkey", [KEY_A])
    sock = Socket(tenant.id, "dev-1")
    await runtime.subscribe(sock)
    channel = raw_channel(runtime, streams.group_name(conf.channel_prefix, sock.keys["device"]))
    await eventually(lambda: subscribers(raw_redis, channel))

    await orm(lambda: outbox.publish(tenant, "run.updated", {"n": 1}, device="dev-1"))
    await relay_send(relay_of([KEY_B]))
    await eventually(lambda: asyncio.sleep(0, runtime.rejected == 1))
    assert sock.offered == []


async def test_relay__pipelined_sends_and_commands_are_encrypted_on_the_wire(tenant_factory, relay_of, raw_redis):
    tenant = await orm(tenant_factory, "onthewire")
    device_group = streams.group_name(conf.channel_prefix, streams.device_stream(tenant.id, "dev-1"))
    device_channel = f"{conf.channel_prefix}:__group__{device_group}"
    pubsub = raw_redis.pubsub()
    await pubsub.psubscribe(f"{conf.channel_prefix}:__group__*")

    def setup() -> None:
        from backplane.models import Edge

        Edge.objects.create(edge_id="edge-wire")
        outbox.publish(tenant, "run.updated", {"n": 1, "marker": "plain-text-marker"}, device="dev-1")
        outbox.publish_command(tenant.id, "edge-wire", "drain", {})

    await orm(setup)
    await relay_send(relay_of([KEY_A]))
    seen: dict[str, bytes] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(seen) < 2 and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None and message["type"] == "pmessage":
            seen[message["channel"].decode()] = message["data"]
    await pubsub.aclose()
    edge_channel = f"{conf.channel_prefix}:__group__{streams.edge_group(conf.channel_prefix, 'edge-wire')}"
    assert set(seen) == {device_channel, edge_channel}
    for data in seen.values():
        assert b"plain-text-marker" not in data and b"drain" not in data and b"bp." not in data
        assert is_sealed(data)  # AES-GCM, not Fernet (docs/decisions/0029-relay-to-peer-hop.md)
        assert make_layer([KEY_A]).deserialize(data)["type"] in ("bp.batch", "bp.command")


def _check_ids() -> set[str]:
    return {message.id for message in checks.check_backplane_settings() if message.id}


def test_check__redis_layer_without_keys_fails_unless_trusted() -> None:
    plain = channel_layers("redis://127.0.0.1:6379/0", prefix="p")
    with override_settings(CHANNEL_LAYERS=plain, BACKPLANE={}):
        assert "backplane.E030" in _check_ids()
    with override_settings(CHANNEL_LAYERS=plain, BACKPLANE={"REDIS_TRUSTED": True}):
        assert "backplane.E030" not in _check_ids()
    core = channel_layers("redis://127.0.0.1:6379/0", prefix="p", layer="core")
    with override_settings(CHANNEL_LAYERS=core, BACKPLANE={}):
        assert "backplane.E030" in _check_ids()
    with override_settings(CHANNEL_LAYERS=channel_layers("redis://127.0.0.1:6379/0", prefix="p", keys=[KEY_A])):
        assert not _check_ids() & {"backplane.E030", "backplane.E031"}
    with override_settings(CHANNEL_LAYERS=channel_layers("", prefix="p"), BACKPLANE={}):
        assert "backplane.E030" not in _check_ids()  # the in-process layer: nothing on a network


def test_check__short_key_and_non_boolean_opt_out_are_refused() -> None:
    with override_settings(CHANNEL_LAYERS=channel_layers("redis://127.0.0.1:6379/0", prefix="p", keys=["short"])):
        assert "backplane.E031" in _check_ids()
    with override_settings(BACKPLANE={"REDIS_TRUSTED": 1}):
        assert "backplane.E032" in _check_ids()
