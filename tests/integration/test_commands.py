"""Management commands through ``call_command``: what they print and what they change."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from backplane import auth, outbox, streams, tokens
from backplane.conf import conf
from backplane.models import AccessToken, OutboxItem, Tenant
from backplane.store import OUTBOX, get_store

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def run(*args: str) -> list[str]:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().splitlines()


def bearer(token: str) -> dict:
    return {"headers": [(b"authorization", f"Bearer {token}".encode())], "subprotocols": ["tyrum-v1"]}


# --- create_tenant ----------------------------------------------------------------------


def test_create_tenant__prints_id_alone_and_slugifies_name(services):
    lines = run("create_tenant", "Acme Corp Ltd")

    tenant = Tenant.objects.get()
    assert lines[-1] == str(tenant.id)
    assert uuid.UUID(lines[-1])
    assert (tenant.slug, tenant.name, tenant.is_active) == ("acme-corp-ltd", "Acme Corp Ltd", True)


def test_create_tenant__explicit_slug(services):
    lines = run("create_tenant", "Acme", "--slug", "acme-eu")

    assert Tenant.objects.get(pk=lines[-1]).slug == "acme-eu"


def test_create_tenant__duplicate_slug_is_command_error(services):
    run("create_tenant", "Acme")

    with pytest.raises(CommandError, match="acme"):
        run("create_tenant", "ACME")
    assert Tenant.objects.count() == 1


def test_create_tenant__empty_slug_is_command_error(services):
    with pytest.raises(CommandError):
        run("create_tenant", "!!!")
    assert not Tenant.objects.exists()


# --- create_token -----------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["slug", "id"])
def test_create_token__prints_token_alone_that_authenticates(tenant_factory, ref):
    tenant = tenant_factory("acme")

    lines = run("create_token", "--tenant", tenant.slug if ref == "slug" else str(tenant.id),
                "--device", "node-7", "--role", "node")

    token = lines[-1]
    assert token.startswith(tokens.TOKEN_PREFIX) and " " not in token
    principal = auth.authenticate(bearer(token))
    assert (principal.tenant_id, principal.device_id, principal.role) == (tenant.id, "node-7", "node")
    row = AccessToken.objects.get()
    assert row.token_hash == auth.hash_token(token)
    assert token not in "\n".join(lines[:-1])


def test_create_token__expires_in(tenant_factory):
    tenant_factory("acme")

    token = run("create_token", "--tenant", "acme", "--device", "d-1", "--role", "client", "--expires-in", "60")[-1]

    assert auth.authenticate(bearer(token)).expires_at is not None


@pytest.mark.parametrize(
    "args",
    [
        ["--tenant", "nope", "--device", "d-1", "--role", "client"],
        ["--tenant", "acme", "--device", "bad id", "--role", "client"],
        ["--tenant", "acme", "--device", "d-1", "--role", "admin"],
    ],
)
def test_create_token__bad_input_is_command_error(tenant_factory, args):
    tenant_factory("acme")

    with pytest.raises(CommandError):
        run("create_token", *args)
    assert not AccessToken.objects.exists()


# --- publish_event ----------------------------------------------------------------------


def test_publish_event__prints_event_id_alone(tenant_factory):
    tenant = tenant_factory("acme")

    lines = run("publish_event", "--tenant", "acme", "--type", "run.updated", "--payload", '{"run_id": "r1"}',
                "--device", "node-7")

    row = OutboxItem.objects.get()
    assert lines[-1] == row.event_id
    assert (row.stream, row.payload) == (streams.device_stream(tenant.id, "node-7"), {"run_id": "r1"})


def test_publish_event__explicit_event_id_is_idempotent(tenant_factory):
    tenant = tenant_factory("acme")
    args = ["publish_event", "--tenant", str(tenant.id), "--type", "a.b", "--payload", "[1]", "--role", "client",
            "--event-id", "e-1"]

    assert run(*args)[-1] == "e-1"
    assert run(*args)[-1] == "e-1"
    rows = list(OutboxItem.objects.values_list("event_id", "stream"))
    assert rows == [("e-1", streams.role_stream(tenant.id, "client"))]


@pytest.mark.parametrize(
    "args",
    [
        ["--tenant", "acme", "--type", "a.b", "--payload", "{not json"],
        ["--tenant", "acme", "--type", "a.b", "--payload", "NaN"],
        ["--tenant", "acme", "--type", "Bad Type", "--payload", "{}"],
        ["--tenant", "nope", "--type", "a.b", "--payload", "{}"],
        ["--tenant", "acme", "--type", "a.b", "--payload", "{}", "--device", "d-1", "--role", "node"],
        ["--tenant", "acme", "--type", "a.b", "--payload", "{}", "--device", "bad id"],
    ],
)
def test_publish_event__bad_input_is_command_error(tenant_factory, args):
    tenant_factory("acme")

    with pytest.raises(CommandError):
        run("publish_event", *args)
    assert not OutboxItem.objects.exists()


# --- revoke_token -----------------------------------------------------------------------


@pytest.mark.parametrize("by", ["token", "id"])
def test_revoke_token__revokes_by_token_or_id(tenant_factory, by):
    tenant = tenant_factory("acme")
    row, token = tokens.create_token(tenant, "d-1", "client")

    out = io.StringIO()
    if by == "token":
        call_command("revoke_token", "-", stdin=io.StringIO(token + "\n"), stdout=out)
    else:
        call_command("revoke_token", str(row.id), stdout=out)
    lines = out.getvalue().splitlines()

    assert str(row.id) in lines[-1]
    assert token not in "\n".join(lines)
    assert AccessToken.objects.get().revoked_at is not None
    with pytest.raises(auth.AuthRefused):
        auth.authenticate(bearer(token))


def test_revoke_token__unknown_is_command_error(services):
    with pytest.raises(CommandError):
        run("revoke_token", str(uuid.uuid4()))


# --- compact_outbox ---------------------------------------------------------------------


@pytest.fixture
def old_forwarded_row(tenant_factory) -> None:
    tenant = tenant_factory("acme")
    outbox.publish(tenant, "a.b", {}, event_id="old")
    outbox.publish(tenant, "a.b", {}, event_id="pending")
    get_store().assign(list(range(conf.SHARDS)), 10)
    get_store().mark_forwarded([OutboxItem.objects.get(event_id="old").id])
    with connection.cursor() as cur:
        cur.execute(f"UPDATE {OUTBOX} SET created_at = now() - interval '2 days'")


def test_compact_outbox__dry_run_deletes_nothing(old_forwarded_row):
    lines = run("compact_outbox", "--dry-run", "--retention", "24h")

    assert lines[-1].startswith("would delete 1 rows")
    assert "kept 1 unforwarded rows past retention" in lines[-1]
    assert OutboxItem.objects.count() == 2


def test_compact_outbox__deletes_forwarded_only(old_forwarded_row):
    lines = run("compact_outbox", "--retention", "1h")

    assert lines[-1].startswith("deleted 1 rows")
    assert "kept 1 unforwarded rows past retention" in lines[-1]
    assert list(OutboxItem.objects.values_list("event_id", flat=True)) == ["pending"]


@pytest.mark.parametrize("value", ["soon", "h", "5w", "-"])
def test_compact_outbox__bad_retention_is_command_error(old_forwarded_row, value):
    with pytest.raises(CommandError):
        run("compact_outbox", "--retention", value)
    assert OutboxItem.objects.count() == 2


def test_publish_event__payload_is_redacted(tenant_factory):
    tenant_factory("acme")

    run("publish_event", "--tenant", "acme", "--type", "a.b", "--payload", json.dumps({"api_key": "k", "n": 1}))

    assert OutboxItem.objects.get().payload == {"api_key": "[REDACTED]", "n": 1}
