"""Directed commands for dead edges are re-routed or recorded, never sent into the void;
and one tenant whose rows make assignment fail does not stop the others."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from backplane import commands, outbox, streams, tokens
from backplane.models import Connection, Edge, OutboxItem

from .helpers import TIMEOUT, drain, join, orm

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def edge(edge_id: str, *, alive: bool) -> Edge:
    beat = timezone.now() - (timedelta(seconds=0) if alive else timedelta(minutes=10))
    row, _ = Edge.objects.update_or_create(edge_id=edge_id, defaults={"heartbeat_at": beat})
    return row


def socket(token_row, edge_id: str, n: int) -> None:  # type: ignore[no-untyped-def]
    Connection.objects.create(
        connection_id=f"{edge_id}-{n}", tenant_id=token_row.tenant_id, device_id=token_row.device_id,
        role=token_row.role, token=token_row, edge_id=edge_id, channel_name=f"chan-{n}",
        expires_at=timezone.now() + timedelta(seconds=30),
    )


@pytest.fixture
def tenant(tenant_factory):  # type: ignore[no-untyped-def]
    return tenant_factory("acme")


async def test_route__command_for_dead_edge_goes_to_the_edge_holding_the_device_now(tenant, make_relay, layer):
    def setup():  # type: ignore[no-untyped-def]
        edge("edge-dead", alive=False)
        edge("edge-live", alive=True)
        row, token = tokens.create_token(tenant, "dev-1", "client")
        socket(row, "edge-dead", 1)  # the old socket (its edge died without a clean close)
        socket(row, "edge-live", 2)  # the device reconnected here
        outbox.publish_command(tenant.id, "edge-dead", "disconnect", {"token_id": str(row.id), "code": 4008})
        return row

    row = await orm(setup)
    live = await join(layer, streams.edge_stream("edge-live"))
    dead = await join(layer, streams.edge_stream("edge-dead"))
    relay = make_relay()

    await relay.cycle()  # routes the dead edge's command: re-routed, not sent
    await relay.cycle()  # forwards the re-routed copy

    original = await orm(lambda: OutboxItem.objects.get(stream=streams.edge_stream("edge-dead")))
    assert original.undeliverable_reason == "edge edge-dead not alive; re-routed to edge-live"
    assert original.forwarded_at is not None
    got = await drain(layer, live, streams.edge_stream("edge-live"))
    bodies = [json.loads(m["body"]) for m in got if m["type"] == "bp.command"]
    assert bodies == [{"command": "disconnect", "tenant_id": str(tenant.id), "token_id": str(row.id), "code": 4008}]
    assert [m for m in await drain(layer, dead, streams.edge_stream("edge-dead")) if m["type"] == "bp.command"] == []


async def test_route__command_without_a_live_target_is_recorded_undeliverable(tenant, make_relay, layer):
    def setup():  # type: ignore[no-untyped-def]
        edge("edge-dead", alive=False)
        row, _ = tokens.create_token(tenant, "dev-1", "client")
        socket(row, "edge-dead", 1)
        outbox.publish_command(tenant.id, "edge-dead", "disconnect", {"device_id": "dev-1", "code": 4008})
        outbox.publish_command(tenant.id, "edge-dead", "drain", {})

    await orm(setup)
    dead = await join(layer, streams.edge_stream("edge-dead"))

    assert await make_relay().cycle() == (2, 2)  # both handled (recorded), none sent: see below

    reasons = await orm(lambda: sorted(OutboxItem.objects.values_list("type", "undeliverable_reason")))
    assert reasons == [
        ("bp.disconnect", "edge edge-dead not alive; no live edge holds the target"),
        ("bp.drain", "edge edge-dead not alive; no live edge holds the target"),
    ]
    assert [m for m in await drain(layer, dead, streams.edge_stream("edge-dead")) if m["type"] == "bp.command"] == []
    out = StringIO()
    await orm(call_command, "backplane_status", stdout=out)
    assert "undeliverable commands (latest 2)" in out.getvalue()
    assert "no live edge holds the target" in out.getvalue()


def test_commands__send_targets_only_live_edges_holding_the_device(tenant):
    edge("edge-a", alive=True)
    edge("edge-b", alive=True)
    edge("edge-c", alive=False)
    row, _ = tokens.create_token(tenant, "dev-1", "client")
    other, _ = tokens.create_token(tenant, "dev-2", "client")
    socket(row, "edge-a", 1)
    socket(row, "edge-c", 2)
    socket(other, "edge-b", 3)

    assert commands.disconnect_device(tenant, "dev-1") == ["edge-a"]
    assert commands.resync(tenant) == ["edge-a", "edge-b"]
    assert commands.make_resume(tenant, "dev-2") == ["edge-b"]
    items = list(OutboxItem.objects.order_by("id").values_list("stream", "type"))
    assert items == [
        (streams.edge_stream("edge-a"), "bp.disconnect"),
        (streams.edge_stream("edge-a"), "bp.resync"),
        (streams.edge_stream("edge-b"), "bp.resync"),
        (streams.edge_stream("edge-b"), "bp.resume"),
    ]


@pytest.fixture
def failing_tenant_trigger():  # type: ignore[no-untyped-def]
    """Make every stream write of one tenant fail, as a broken tenant's query would."""
    made: list[str] = []

    def install(tenant_id) -> None:  # type: ignore[no-untyped-def]
        with connection.cursor() as cur:
            cur.execute(
                "CREATE OR REPLACE FUNCTION bp_test_fail() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.key LIKE '%%{tenant_id.hex}%%' THEN RAISE EXCEPTION 'tenant is broken'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            cur.execute(
                "CREATE TRIGGER bp_test_fail BEFORE INSERT OR UPDATE ON backplane_stream "
                "FOR EACH ROW EXECUTE FUNCTION bp_test_fail()"
            )
        made.append("x")

    yield install
    if made:
        with connection.cursor() as cur:
            cur.execute("DROP TRIGGER IF EXISTS bp_test_fail ON backplane_stream")
            cur.execute("DROP FUNCTION IF EXISTS bp_test_fail()")


async def test_relay__a_failing_tenant_does_not_stop_the_others(tenant_factory, make_relay, layer,
                                                                failing_tenant_trigger):
    broken = await orm(tenant_factory, "broken")
    healthy = await orm(tenant_factory, "healthy")
    assert streams.shard_of(broken.id, 16) is not None
    await orm(failing_tenant_trigger, broken.id)
    await orm(outbox.publish, broken, "run.updated", {"n": 1}, device="dev-1")
    await orm(outbox.publish, healthy, "run.updated", {"n": 2}, device="dev-1")
    key = streams.device_stream(healthy.id, "dev-1")
    channel = await join(layer, key)
    relay = make_relay()

    assigned, forwarded = await relay.cycle()

    assert (assigned, forwarded) == (1, 1)
    assert list(relay.quarantine) == [broken.id]
    got = await asyncio.wait_for(drain(layer, channel, key), TIMEOUT)
    assert [m["items"][0][0] for m in got if m["type"] == "bp.batch"] == [1]
    rows = await orm(lambda: dict(OutboxItem.objects.values_list("tenant__slug", "stream_offset")))
    assert rows == {"broken": None, "healthy": 1}
    # Set aside, the broken tenant no longer fails every cycle.
    assert await relay.cycle() == (0, 0)


async def test_relay__a_failed_assignment_keeps_the_marks_it_carried(tenant_factory, make_relay, layer,
                                                                      failing_tenant_trigger):
    """The last cycle's marks ride in the next assignment's transaction; when that fails they
    are written before the tenant-by-tenant retry, so its resend sweep does not send those
    rows again — and the session is usable for the retry."""
    broken = await orm(tenant_factory, "broken")
    healthy = await orm(tenant_factory, "healthy")
    key = streams.device_stream(healthy.id, "dev-1")
    channel = await join(layer, key)
    relay = make_relay()
    await orm(outbox.publish, healthy, "run.updated", {"n": 1}, device="dev-1")
    assert await relay.cycle() == (1, 1)
    assert len(relay.unmarked) == 1
    await orm(failing_tenant_trigger, broken.id)
    await orm(outbox.publish, broken, "run.updated", {"n": 2}, device="dev-1")
    await orm(outbox.publish, healthy, "run.updated", {"n": 3}, device="dev-1")

    assert await relay.cycle() == (1, 1)  # the broken tenant's row set aside, the healthy one sent

    assert list(relay.quarantine) == [broken.id]
    got = await asyncio.wait_for(drain(layer, channel, key), TIMEOUT)
    assert [m["items"][0][0] for m in got if m["type"] == "bp.batch"] == [1, 2]  # offset 1 once
    forwarded = await orm(lambda: dict(OutboxItem.objects.values_list("stream_offset", "forwarded_at")))
    assert forwarded[1] is not None
