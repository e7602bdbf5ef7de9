"""Integration tests of the relay cycle: PostgreSQL outbox → offsets → Redis channel layer groups."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from backplane import outbox, relay, streams
from backplane.conf import conf
from backplane.models import OutboxItem, Stream
from backplane.store import get_store

from .helpers import TIMEOUT, drain, eventually, items_of, join, orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def publish_each(tenant, n: int, prefix: str, **audience) -> list[str]:
    """Publish ``n`` events, each in its own transaction (autocommit)."""
    return [outbox.publish(tenant, "run.updated", {"n": i}, event_id=f"{prefix}-{i}", **audience) for i in range(n)]


def rows_by_event_id() -> dict[str, OutboxItem]:
    return {row.event_id: row for row in OutboxItem.objects.all()}


async def test_relay__offsets_contiguous_per_stream_from_one(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    keys = streams.connection_streams(tenant.id, "client", "dev-1")
    channel = await join(layer, keys["tenant"], keys["device"])
    first = await orm(publish_each, tenant, 5, "t")
    dev = await orm(publish_each, tenant, 3, "d", device="dev-1")
    relay_ = make_relay()

    assert await relay_.cycle() == (8, 8)

    got = items_of(await drain(layer, channel, keys["tenant"]))
    tenant_items = [(o, f["event"]["event_id"]) for k, o, f in got if k == keys["tenant"]]
    device_items = [(o, f["event"]["event_id"]) for k, o, f in got if k == keys["device"]]
    assert tenant_items == list(zip(range(1, 6), first, strict=True))
    assert device_items == list(zip(range(1, 4), dev, strict=True))

    more = await orm(publish_each, tenant, 2, "t2")
    assert await relay_.cycle() == (2, 2)
    got = items_of(await drain(layer, channel, keys["tenant"]))
    assert [(o, f["event"]["event_id"]) for _, o, f in got] == [(6, more[0]), (7, more[1])]
    heads = await orm(lambda: dict(Stream.objects.values_list("key", "last_offset")))
    assert heads == {keys["tenant"]: 7, keys["device"]: 3}


async def test_relay__one_batch_message_per_stream_with_protocol_frames(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    keys = streams.connection_streams(tenant.id, "node", "n-1")
    channel = await join(layer, *keys.values())
    await orm(publish_each, tenant, 2, "t")
    await orm(publish_each, tenant, 3, "r", role="node")
    await orm(publish_each, tenant, 1, "d", device="n-1")

    assert await make_relay().cycle() == (6, 6)

    messages = await drain(layer, channel, keys["tenant"])
    epochs = await orm(lambda: dict(Stream.objects.values_list("key", "epoch")))
    rows = await orm(rows_by_event_id)
    assert sorted(m["stream"] for m in messages) == sorted(keys.values())
    for message in messages:
        assert set(message) == {"type", "stream", "epoch", "items"}
        assert message["type"] == "bp.batch"
        assert message["epoch"] == epochs[message["stream"]]
        for item in message["items"]:
            assert isinstance(item, list) and len(item) == 2
            offset, text = item
            assert isinstance(text, str)
            frame = json.loads(text)
            row = rows[frame["event"]["event_id"]]
            assert frame == {
                "type": "event", "stream": streams.audience_of(message["stream"]),
                "epoch": message["epoch"], "offset": offset,
                "event": {"event_id": row.event_id, "type": "run.updated",
                          "occurred_at": row.occurred_at.isoformat().replace("+00:00", "Z"),
                          "payload": row.payload},
            }
            assert row.stream_offset == offset


async def test_relay__marks_forwarded_and_does_not_resend(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    await orm(publish_each, tenant, 3, "t")
    relay_ = make_relay()

    assert await relay_.cycle() == (3, 3)
    assert len(items_of(await drain(layer, channel, key))) == 3
    # Sent; marked forwarded in the next assignment's transaction (no round trip of their own).
    assert len(relay_.unmarked) == 3
    assert await orm(lambda: OutboxItem.objects.filter(forwarded_at__isnull=True).count()) == 3

    assert await relay_.cycle() == (0, 0)
    assert relay_.unmarked == []
    rows = await orm(lambda: list(OutboxItem.objects.values_list("assigned_at", "forwarded_at")))
    assert len(rows) == 3 and all(assigned and forwarded and assigned <= forwarded for assigned, forwarded in rows)
    assert await drain(layer, channel, key) == []


class SilentBell:
    """A doorbell that never rings (the relay's waits all run to their timeouts, unless the
    relay is stopped: ``interrupt``)."""

    def __init__(self) -> None:
        self.interrupted = asyncio.Event()

    async def __aenter__(self) -> SilentBell:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def wait(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.interrupted.wait(), timeout)
        return False

    def interrupt(self) -> None:
        self.interrupted.set()

    def waiting(self) -> bool:
        return False


class RungBell:
    """A doorbell whose ring is always waiting (a next cycle is always due)."""

    def waiting(self) -> bool:
        return True


async def test_relay__overlapped_send_is_collected_before_the_next_send_in_offset_order(
    tenant_factory, make_relay, layer
):
    """With a next cycle due, a cycle leaves its send running; the next cycle assigns
    meanwhile and waits for it before sending: each stream's offsets arrive in order, each
    once, and the first send's rows are marked by a later assignment."""
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    relay_ = make_relay()
    relay_.bell = RungBell()  # type: ignore[assignment]
    await orm(publish_each, tenant, 3, "a")
    assert await relay_.cycle(overlap=True) == (3, 3)
    assert relay_._sending is not None  # left running
    await orm(publish_each, tenant, 2, "b")
    assert await relay_.cycle(overlap=True) == (2, 2)  # collected the first, left its own
    await orm(publish_each, tenant, 1, "c")
    # The second send done before the third assignment begins (on a slow machine it may still
    # be in flight then, and its marks would ride the assignment after): its rows ride this one.
    await asyncio.wait({relay_._sending}, timeout=10)
    assert relay_._sending.done()
    assert await relay_.cycle() == (1, 1)  # not overlapped: its own send awaited
    assert relay_._sending is None and relay_.forwarded_total == 6
    got = items_of(await drain(layer, channel, key))
    assert [o for _, o, _ in got] == [1, 2, 3, 4, 5, 6]
    forwarded = lambda: set(OutboxItem.objects.filter(forwarded_at__isnull=False).values_list("event_id", flat=True))  # noqa: E731
    assert await orm(forwarded) == {"a-0", "a-1", "a-2", "b-0", "b-1"}  # rode the next assignments
    await relay_.aclose()
    assert len(await orm(forwarded)) == 6


async def test_relay__running_relay_marks_on_its_own_when_no_assignment_follows(
    tenant_factory, make_relay, layer, monkeypatch
):
    """With nothing more to assign, a running relay marks what it sent after MARK_LINGER_SECS."""
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    await orm(publish_each, tenant, 2, "t")
    monkeypatch.setattr(relay, "Listener", SilentBell)
    relay_ = make_relay(poll_interval=30.0)  # its first cycle sends both; no other cycle comes
    stop = asyncio.Event()
    running = asyncio.create_task(relay_.run(stop))
    try:
        unmarked = lambda: OutboxItem.objects.filter(forwarded_at__isnull=True).count() == 0  # noqa: E731
        await eventually(lambda: orm(unmarked))
        assert relay_.unmarked == [] and not running.done()
        assert relay_.forwarded_total == 2
        assert len(items_of(await drain(layer, channel, key))) == 2
    finally:
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)


async def test_relay__large_stream_is_chunked_in_order(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    n = relay.MAX_ITEMS_PER_MESSAGE + 30
    await orm(outbox.publish_many, tenant, [{"type": "a.b", "payload": i} for i in range(n)])

    assert await make_relay().cycle() == (n, n)

    messages = await drain(layer, channel, key)
    assert [len(m["items"]) for m in messages] == [relay.MAX_ITEMS_PER_MESSAGE, 30]
    assert [o for _, o, _ in items_of(messages)] == list(range(1, n + 1))
    assert [f["event"]["payload"] for _, _, f in items_of(messages)] == list(range(n))


async def test_relay__batch_size_bounds_a_cycle_and_offsets_continue(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    ids = await orm(publish_each, tenant, 5, "t")
    relay_ = make_relay(batch_size=3)

    assert await relay_.cycle() == (3, 3)
    assert await relay_.cycle() == (2, 2)
    assert await relay_.cycle() == (0, 0)

    got = items_of(await drain(layer, channel, key))
    assert [(o, f["event"]["event_id"]) for _, o, f in got] == list(zip(range(1, 6), ids, strict=True))


async def test_relay__crash_after_assign_forwards_same_offsets(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    keys = streams.connection_streams(tenant.id, "client", "dev-1")
    channel = await join(layer, keys["tenant"], keys["role"])
    await orm(publish_each, tenant, 3, "t")
    await orm(publish_each, tenant, 2, "r", role="client")
    # A relay that died right after its assignment transaction committed.
    assert len(await orm(get_store().assign, list(range(conf.SHARDS)), 1000)) == 5
    assigned = await orm(lambda: dict(OutboxItem.objects.values_list("event_id", "stream_offset")))
    assert sorted(assigned.values()) == [1, 1, 2, 2, 3]

    relay_ = make_relay()
    assert await relay_.cycle() == (0, 5)
    await relay_.flush_marks()

    got = items_of(await drain(layer, channel, keys["tenant"]))
    assert {f["event"]["event_id"]: o for _, o, f in got} == assigned
    after = await orm(lambda: dict(OutboxItem.objects.values_list("event_id", "stream_offset")))
    assert after == assigned
    assert await orm(lambda: OutboxItem.objects.filter(forwarded_at__isnull=True).count()) == 0


async def test_relay__crash_before_mark_resends_same_offsets(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    ids = await orm(publish_each, tenant, 3, "t")

    first = make_relay()
    assert await first.cycle() == (3, 3)
    # It dies before the rows sent are marked (kept for its next assignment): its shards'
    # locks go with its session.
    first.unmarked = []
    await first.leases.release()
    relay_ = make_relay()
    assert await relay_.cycle() == (0, 3)
    await relay_.flush_marks()

    got = items_of(await drain(layer, channel, key))
    expected = list(zip(range(1, 4), ids, strict=True))
    assert [(o, f["event"]["event_id"]) for _, o, f in got] == expected + expected  # at least once, same offsets
    assert await orm(lambda: OutboxItem.objects.filter(forwarded_at__isnull=True).count()) == 0


async def test_relay__forwards_only_its_shards(tenant_factory, make_relay, layer):
    a = await orm(tenant_factory, "a")
    for i in range(64):
        b = await orm(tenant_factory, f"b{i}")
        if streams.shard_of(b.id, conf.SHARDS) != streams.shard_of(a.id, conf.SHARDS):
            break
    else:
        pytest.fail("no tenant on another shard")
    await orm(outbox.publish, a, "a.b", 1, event_id="a")
    await orm(outbox.publish, b, "a.b", 2, event_id="b")

    relay_ = make_relay(shards=[streams.shard_of(a.id, conf.SHARDS)])
    assert await relay_.cycle() == (1, 1)
    await relay_.flush_marks()

    rows = await orm(lambda: {r.event_id: (r.stream_offset, r.forwarded_at is not None)
                              for r in OutboxItem.objects.all()})
    assert rows == {"a": (1, True), "b": (None, False)}


async def test_relay__stream_created_by_an_edge_keeps_its_epoch(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    keys = streams.connection_streams(tenant.id, "client", "dev-1")
    heads = await orm(get_store().ensure_streams, tenant.id, list(keys.values()))
    assert {h.offset for h in heads.values()} == {0}
    channel = await join(layer, keys["device"])
    await orm(outbox.publish, tenant, "a.b", {}, device="dev-1", event_id="e-1")

    assert await make_relay().cycle() == (1, 1)

    (message,) = await drain(layer, channel, keys["device"])
    assert message["epoch"] == heads[keys["device"]].epoch
    assert [o for _, o, _ in items_of([message])] == [1]
    again = await orm(get_store().ensure_streams, tenant.id, list(keys.values()))
    assert again[keys["device"]].offset == 1
    assert {k: h.epoch for k, h in again.items()} == {k: h.epoch for k, h in heads.items()}


async def test_relay__stop_wakes_a_relay_waiting_for_its_doorbell(make_relay):
    """The run loop waits on the doorbell alone (no task per wait); ``stop`` interrupts it, so
    a relay with a long poll interval stops at once, not at its next poll."""
    relay_ = make_relay(poll_interval=30.0)
    stop = asyncio.Event()
    running = asyncio.create_task(relay_.run(stop))
    try:
        await eventually(lambda: _true(relay_.bell is not None))
        await asyncio.sleep(0.2)  # in the wait after its cycles (the doorbell's first wake-up included)
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, TIMEOUT)
    assert relay_.polls == 0  # woken by the stop, not by the 30 s poll


async def _true(value: bool) -> bool:
    return value
