"""Shared fixtures. Unit tests need no services; integration and e2e tests need
PostgreSQL and Redis (``make test`` points DATABASE_URL/REDIS_URL at them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


def _require_services() -> None:
    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.fail("integration/e2e tests need DATABASE_URL=postgres://… (run them with `make test`)")
    if not settings.REDIS_URL:
        pytest.fail("integration/e2e tests need REDIS_URL=redis://… (run them with `make test`)")


@pytest.fixture
def services(transactional_db: None) -> Iterator[None]:
    """Real PostgreSQL (committed data, visible to child processes) and Redis."""
    _require_services()
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.ping()
    yield
    client.close()


@pytest.fixture
def tenant_factory(services: None):  # type: ignore[no-untyped-def]
    from backplane.models import Tenant

    def make(slug: str = "acme", **kw):  # type: ignore[no-untyped-def]
        return Tenant.objects.create(slug=slug, name=kw.pop("name", slug.title()), **kw)

    return make


@pytest.fixture
def token_factory(services: None):  # type: ignore[no-untyped-def]
    from backplane import auth

    def make(tenant, device: str = "dev-1", role: str = "client", **kw) -> str:  # type: ignore[no-untyped-def]
        return auth.create_token(tenant, device, role, **kw)[1]

    return make
