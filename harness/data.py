"""Tenants, tokens, operator sessions, publishing and waits on the outbox, through the ORM.

The functions are synchronous (the ORM is); async tests call them through ``orm``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

# Bound on waits for the relay (seconds).
RELAY_TIMEOUT_SECS = 10.0


async def orm(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a worker thread (the ORM is sync-only) and close that thread's connection.

    Closing matters: a connection left open in a pool thread would keep the test database
    from being dropped at the end of the session.
    """
    from django.db import connections

    def run() -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    return await asyncio.to_thread(run)


def make_tenant(slug: str | None = None, **kw: Any) -> Any:
    """A tenant of one test: a slug of its own unless given."""
    from backplane.models import Tenant

    slug = slug or f"t-{uuid.uuid4().hex[:10]}"
    return Tenant.objects.create(slug=slug, name=kw.pop("name", slug), **kw)


def make_token(tenant: Any, device: str = "dev-1", role: str = "client", expires_at: datetime | None = None) -> str:
    from backplane import tokens

    return tokens.create_token(tenant, device, role, expires_at=expires_at)[1]


def operator_session(tenant: Any) -> str:
    """Log a Django user in (a server-side session) as an operator of ``tenant``; return the
    ``Cookie`` header value. Edges accept it from an allowed Origin (``ALLOWED_ORIGINS``)."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    from backplane.models import OperatorAccess

    user = get_user_model().objects.create_user(f"op-{tenant.slug}", password="not-used-here-1")  # noqa: S106 - never logged in with
    OperatorAccess.objects.create(user=user, tenant=tenant)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


def publish(tenant: Any, type: str, payload: Any, **kw: Any) -> str:
    """Publish one event in its own transaction, as producer code does."""
    from django.db import transaction

    from backplane import publish as bp_publish

    with transaction.atomic():
        return bp_publish(tenant, type, payload, **kw)


def publish_many(tenant: Any, events: list[dict[str, Any]]) -> list[str]:
    from django.db import transaction

    from backplane import publish_many as bp_publish_many

    with transaction.atomic():
        return bp_publish_many(tenant, events)


def events(n: int, kind: str, **audience: str) -> list[dict[str, Any]]:
    """``n`` events of type ``kind`` for ``publish_many``, payload ``{"i": 0..n-1}``."""
    return [{"type": kind, "payload": {"i": i}, **audience} for i in range(n)]


def stream_key(tenant: Any, name: str, *, device: str = "dev-1", role: str = "client") -> str:
    from backplane import streams

    return streams.connection_streams(tenant.id, role, device)[name]


def last_offset(key: str) -> int:
    from backplane.models import Stream

    row = Stream.objects.filter(key=key).values_list("last_offset", flat=True).first()
    return int(row or 0)


async def wait_assigned(key: str, offset: int, timeout: float = RELAY_TIMEOUT_SECS) -> None:
    """Wait until the relay has assigned ``offset`` in stream ``key`` (bounded)."""
    deadline = time.monotonic() + timeout
    while await orm(last_offset, key) < offset:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {key} did not reach offset {offset} within {timeout}s")
        await asyncio.sleep(0.05)


async def wait_forwarded(tenant: Any, timeout: float = RELAY_TIMEOUT_SECS) -> None:
    """Wait until no event of ``tenant`` is waiting for the relay (bounded)."""
    from backplane.models import OutboxItem

    def pending() -> int:
        return OutboxItem.objects.filter(tenant=tenant, kind="event", forwarded_at__isnull=True).count()

    deadline = time.monotonic() + timeout
    while await orm(pending):
        if time.monotonic() > deadline:
            raise TimeoutError(f"events of {tenant} not forwarded within {timeout}s")
        await asyncio.sleep(0.05)


# --- many tenants and tokens at once (benchmarks) -----------------------------------------


def balanced_tenants(count: int, shards: int = 16) -> list[uuid.UUID]:
    """Tenant ids spread evenly over the two halves of the shard space (so two relays with
    shards 0..7 and 8..15 get the same load) and over distinct shards where possible."""
    from backplane import streams

    half = shards // 2
    want = {0: count - count // 2, 1: count // 2}
    used: set[int] = set()
    out: list[uuid.UUID] = []
    for _ in range(100_000):
        if len(out) == count:
            break
        tid = uuid.uuid4()
        shard = streams.shard_of(tid, shards)
        side = 0 if shard < half else 1
        if want[side] == 0 or (shard in used and len(used) < shards):
            continue
        want[side] -= 1
        used.add(shard)
        out.append(tid)
    assert len(out) == count, "could not spread tenants over the shards"
    return out


def make_tenants(count: int, slug: str = "t") -> list[Any]:
    """``count`` tenants ``<slug>0``… spread over the shards (``balanced_tenants``)."""
    from backplane.models import Tenant

    return [
        Tenant.objects.create(id=tid, slug=f"{slug}{i}", name=f"{slug.upper()}{i}")
        for i, tid in enumerate(balanced_tenants(count))
    ]


def make_tokens(tenant_of: Sequence[Any], devices: Sequence[str], role: str = "node") -> list[str]:
    """Create one token per device in one statement (``tokens.create_token`` row by row is slow
    for 10 000 peers); return the tokens in order."""
    from backplane.models import AccessToken
    from backplane.tokens import TOKEN_PREFIX, hash_token

    made = [TOKEN_PREFIX + secrets.token_urlsafe(32) for _ in devices]
    AccessToken.objects.bulk_create(
        [
            AccessToken(tenant=t, device_id=d, role=role, token_hash=hash_token(tok))
            for t, d, tok in zip(tenant_of, devices, made, strict=True)
        ],
        batch_size=2000,
    )
    return made
