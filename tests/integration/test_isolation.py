"""Tenant isolation at the data level: stream keys, range reads, heads and relay groups."""

from __future__ import annotations

import pytest

from backplane import outbox, streams
from backplane.conf import conf
from backplane.models import OutboxItem
from backplane.store import get_store

from .helpers import drain, items_of, join

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

DEVICE = "dev-1"  # the same device id and role in both tenants
ROLE = "client"
ALL_SHARDS = list(range(conf.SHARDS))


def publish_to_all_audiences(tenant, tag: str) -> set[str]:
    ids = set()
    for n in range(2):
        ids.add(outbox.publish(tenant, "run.updated", {"tag": tag}, event_id=f"{tag}-t{n}"))
        ids.add(outbox.publish(tenant, "run.updated", {"tag": tag}, role=ROLE, event_id=f"{tag}-r{n}"))
        ids.add(outbox.publish(tenant, "run.updated", {"tag": tag}, device=DEVICE, event_id=f"{tag}-d{n}"))
    return ids


@pytest.fixture
def two_tenants(tenant_factory):
    a, b = tenant_factory("alpha"), tenant_factory("beta")
    return a, b, publish_to_all_audiences(a, "A"), publish_to_all_audiences(b, "B")


def test_isolation__stream_keys_of_tenants_are_disjoint(two_tenants):
    a, b, _, _ = two_tenants

    keys_a = streams.connection_streams(a.id, ROLE, DEVICE)
    keys_b = streams.connection_streams(b.id, ROLE, DEVICE)

    assert not set(keys_a.values()) & set(keys_b.values())
    groups = {streams.group_name("p", k) for k in [*keys_a.values(), *keys_b.values()]}
    assert len(groups) == 6


def test_isolation__read_range_returns_only_own_rows(two_tenants):
    a, b, ids_a, ids_b = two_tenants
    assert len(get_store().assign(ALL_SHARDS, 1000)) == 12

    for tenant, own in ((a, ids_a), (b, ids_b)):
        seen = set()
        for key in streams.connection_streams(tenant.id, ROLE, DEVICE).values():
            items = get_store().read_range(key, 0, 10**9)
            assert [i.offset for i in items] == [1, 2]
            seen |= {i.event_id for i in items}
        assert seen == own
    assert all(row.stream.split(":")[1] == row.tenant_id.hex for row in OutboxItem.objects.all())


def test_isolation__heads_are_per_tenant(two_tenants):
    a, b, _, _ = two_tenants
    get_store().assign(ALL_SHARDS, 1000)
    outbox.publish(a, "run.updated", {}, device=DEVICE)
    get_store().assign(ALL_SHARDS, 1000)

    heads_a = get_store().stream_heads(list(streams.connection_streams(a.id, ROLE, DEVICE).values()))
    heads_b = get_store().stream_heads(list(streams.connection_streams(b.id, ROLE, DEVICE).values()))

    assert sorted(h.offset for h in heads_a.values()) == [2, 2, 3]
    assert sorted(h.offset for h in heads_b.values()) == [2, 2, 2]
    assert not {h.epoch for h in heads_a.values()} & {h.epoch for h in heads_b.values()}


async def test_isolation__relay_sends_each_tenant_only_to_its_groups(two_tenants, make_relay, layer):
    a, b, ids_a, ids_b = two_tenants
    keys_a = streams.connection_streams(a.id, ROLE, DEVICE)
    keys_b = streams.connection_streams(b.id, ROLE, DEVICE)
    peer_a = await join(layer, *keys_a.values())
    peer_b = await join(layer, *keys_b.values())

    assert await make_relay().cycle() == (12, 12)

    got_a = items_of(await drain(layer, peer_a, keys_a["tenant"]))
    got_b = items_of(await drain(layer, peer_b, keys_b["tenant"]))
    assert {f["event"]["event_id"] for _, _, f in got_a} == ids_a
    assert {f["event"]["event_id"] for _, _, f in got_b} == ids_b
    assert {k for k, _, _ in got_a} == set(keys_a.values())
    assert {f["event"]["payload"]["tag"] for _, _, f in got_b} == {"B"}
    # Frames name the stream relative to the connection: no tenant or device ids inside.
    for _, _, frame in got_a + got_b:
        assert frame["stream"] in streams.STREAM_NAMES
        assert a.id.hex not in str(frame) and b.id.hex not in str(frame)
