"""Shared fixtures. Unit tests need no services; integration and e2e tests need
PostgreSQL and Redis (``make test`` points DATABASE_URL/REDIS_URL at them).

Helpers live in the ``harness`` package at the repository root; conftest files hold fixtures only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from harness import env, testdb


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
    from backplane import tokens

    def make(tenant, device: str = "dev-1", role: str = "client", **kw) -> str:  # type: ignore[no-untyped-def]
        return tokens.create_token(tenant, device, role, **kw)[1]

    return make


# --- committed data shared with other threads and processes (in-process edges, e2e, faults) ---


@pytest.fixture(scope="session")
def test_database(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """The test database, even when only tests that share committed data were collected."""
    with testdb.test_database(django_db_blocker):
        yield


@pytest.fixture(scope="module")
def committed_db(test_database: None, django_db_blocker: Any) -> Iterator[None]:
    """Committed data for one module's tests, emptied when the module is done
    (``harness.testdb.committed_database``)."""
    with testdb.committed_database(django_db_blocker):
        yield


@pytest.fixture(scope="module")
def e2e_db(test_database: None, django_db_blocker: Any) -> Iterator[None]:
    """``committed_db`` on real PostgreSQL and Redis, for child processes to share."""
    import redis

    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql") or not settings.REDIS_URL:
        pytest.fail("e2e tests need DATABASE_URL=postgres://… and REDIS_URL=redis://… (run them with `make test`)")
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.ping()
    client.close()
    with testdb.committed_database(django_db_blocker):
        yield


@pytest.fixture(scope="module")
def module_env(e2e_db: None) -> dict[str, str]:
    """The child processes' environment: this run's test database and Redis."""
    return env.child_env()
