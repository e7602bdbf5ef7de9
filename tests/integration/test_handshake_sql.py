"""The handshake batches' hand-written PostgreSQL statements (decision 0038) answer what the
ORM queries they replace answer, on the same rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from backplane import auth, directory
from backplane.models import AccessToken, Connection, Edge

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_token_rows__the_statement_reads_what_the_orm_reads(tenant_factory, token_factory):
    acme, other = tenant_factory("acme"), tenant_factory("other", is_active=False)
    tokens = [token_factory(acme, "dev-1"), token_factory(acme, "dev-2", "node"), token_factory(other, "dev-3")]
    AccessToken.objects.filter(device_id="dev-2").update(revoked_at=timezone.now(), expires_at=timezone.now())
    hashes = {auth.hash_token(t) for t in tokens} | {"no-such-hash"}

    rows = sorted(auth._token_rows_of(hashes))

    assert len(rows) == 3
    assert rows == sorted(auth._token_rows().filter(token_hash__in=hashes))


def test_live_counts__the_statement_counts_what_the_orm_counts(tenant_factory, token_factory):
    acme, other = tenant_factory("acme"), tenant_factory("other")
    token_factory(acme, "dev-1"), token_factory(other, "dev-2")
    t1, t2 = AccessToken.objects.order_by("device_id")
    Edge.objects.create(edge_id="e1", host="h")
    now = timezone.now()
    for n, (tenant, token, expires) in enumerate(
        [(acme, t1, 60), (acme, t1, 60), (acme, None, 60), (other, t2, 60), (other, t2, -60)]
    ):
        Connection.objects.create(
            connection_id=f"c{n}",
            tenant=tenant,
            device_id="d",
            role="client",
            token=token,
            edge_id="e1",
            channel_name="x",
            expires_at=now + timedelta(seconds=expires),
        )
    tokens, tenants = {t1.id, t2.id}, {acme.id, other.id}

    counted = directory._live_counts(now, tokens, tenants)

    assert counted == ({t1.id: 2, t2.id: 1}, {acme.id: 3, other.id: 1})
    assert counted == directory._live_counts_orm(now, tokens, tenants)
    assert directory._live_counts(now, set(), {other.id}) == ({}, {other.id: 1})
    assert directory._live_counts(now, set(), set()) == ({}, {})
