"""Out-of-order commits (the classic ``id > cursor`` bug) and rolled-back publishes, through the relay."""

from __future__ import annotations

import asyncio
import threading

import pytest
from django.db import connection, transaction

from backplane import outbox, streams
from backplane.models import OutboxItem

from .helpers import TIMEOUT, drain, items_of, join, orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


class HeldTransaction(threading.Thread):
    """Publish in a transaction on this thread's own connection; commit only when released."""

    def __init__(self, tenant, event_id: str) -> None:
        super().__init__(daemon=True)
        self.tenant = tenant
        self.event_id = event_id
        self.inserted = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with transaction.atomic():
                outbox.publish(self.tenant, "run.updated", {"who": "A"}, event_id=self.event_id)
                self.inserted.set()
                if not self.release.wait(TIMEOUT * 2):
                    raise TimeoutError("never released")
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.inserted.set()
            connection.close()


async def test_relay__row_committed_after_a_higher_id_is_not_skipped(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)
    holder = HeldTransaction(tenant, "A")
    holder.start()
    try:
        assert await asyncio.to_thread(holder.inserted.wait, TIMEOUT)
        assert holder.error is None
        await orm(outbox.publish, tenant, "run.updated", {"who": "B"}, event_id="B")
        relay = make_relay()

        assert await relay.cycle() == (1, 1)  # only B is committed and visible
        first = items_of(await drain(layer, channel, key))
        assert [(o, f["event"]["event_id"]) for _, o, f in first] == [(1, "B")]
    finally:
        holder.release.set()
        await asyncio.to_thread(holder.join, TIMEOUT)
    assert not holder.is_alive()
    assert holder.error is None

    assert await relay.cycle() == (1, 1)
    await relay.flush_marks()

    second = items_of(await drain(layer, channel, key))
    assert [(o, f["event"]["event_id"]) for _, o, f in second] == [(2, "A")]
    rows = await orm(lambda: {r.event_id: (r.id, r.stream_offset, r.forwarded_at is not None)
                              for r in OutboxItem.objects.all()})
    assert rows["A"][0] < rows["B"][0], "A must hold the lower id for this test to mean anything"
    assert {k: v[1:] for k, v in rows.items()} == {"A": (2, True), "B": (1, True)}


async def test_relay__rolled_back_publish_forwards_nothing(tenant_factory, make_relay, layer):
    tenant = await orm(tenant_factory, "acme")
    key = streams.tenant_stream(tenant.id)
    channel = await join(layer, key)

    def publish_then_fail() -> None:
        with transaction.atomic():
            outbox.publish(tenant, "run.updated", {"n": 1}, event_id="gone")
            assert OutboxItem.objects.filter(event_id="gone").exists()  # inside the transaction
            raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        await orm(publish_then_fail)
    relay = make_relay()

    assert await relay.cycle() == (0, 0)
    assert await drain(layer, channel, key) == []
    assert not await orm(OutboxItem.objects.exists)

    await orm(outbox.publish, tenant, "run.updated", {"n": 2}, event_id="kept")
    assert await relay.cycle() == (1, 1)
    got = items_of(await drain(layer, channel, key))
    assert [(o, f["event"]["event_id"]) for _, o, f in got] == [(1, "kept")]


def test_publish__rolled_back_transaction_writes_nothing(tenant_factory):
    tenant = tenant_factory("acme")

    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.publish(tenant, "run.updated", {"n": 1})
        outbox.publish_many(tenant, [{"type": "a.b", "payload": 2}, {"type": "a.b", "payload": 3}])
        raise RuntimeError("producer failed")

    assert not OutboxItem.objects.exists()


def test_publish__rolled_back_savepoint_keeps_outer_publish(tenant_factory):
    tenant = tenant_factory("acme")

    with transaction.atomic():
        outbox.publish(tenant, "run.updated", {}, event_id="outer")
        with pytest.raises(RuntimeError), transaction.atomic():
            outbox.publish(tenant, "run.updated", {}, event_id="inner")
            raise RuntimeError("inner step failed")

    assert list(OutboxItem.objects.values_list("event_id", flat=True)) == ["outer"]
