"""The relay doorbell: a Redis PUBLISH on ``<prefix>:doorbell`` rung on commit, never on rollback."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from backplane import doorbell, exceptions, outbox, streams
from backplane.conf import conf

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SILENCE = 0.5  # how long "nothing rang" is watched for


@pytest.fixture
def bell(services: None) -> Iterator[Any]:
    """A redis-py subscription to this test's own doorbell channel (a unique prefix)."""
    prefix = f"tyrumtest-bell-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.REDIS_URL)
    pubsub = client.pubsub()
    with override_settings(BACKPLANE_CHANNEL_PREFIX=prefix):
        assert doorbell.channel_name() == f"{prefix}:doorbell"
        pubsub.subscribe(doorbell.channel_name())
        confirm = pubsub.get_message(timeout=5)
        assert confirm is not None and confirm["type"] == "subscribe"
        yield pubsub
    pubsub.close()
    client.close()


def rings(pubsub: Any, wait: float) -> list[bytes]:
    """Collect rings for up to ``wait`` seconds; returns as soon as one arrived."""
    deadline = time.monotonic() + wait
    got: list[bytes] = []
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=max(0.0, deadline - time.monotonic()))
        if message is not None:
            got.append(message["data"])
            break
    return got


def test_doorbell__rings_on_commit_with_the_shard(bell, tenant_factory):
    tenant = tenant_factory("acme")

    with transaction.atomic():
        outbox.publish(tenant, "run.updated", {})
        assert rings(bell, SILENCE) == []  # not before the commit

    assert rings(bell, 5) == [str(streams.shard_of(tenant.id, conf.SHARDS)).encode()]


def test_doorbell__autocommit_publish_rings(bell, tenant_factory):
    tenant = tenant_factory("acme")

    outbox.publish(tenant, "run.updated", {})

    assert len(rings(bell, 5)) == 1


def test_doorbell__rolled_back_publish_rings_nothing(bell, tenant_factory):
    tenant = tenant_factory("acme")

    with pytest.raises(RuntimeError), transaction.atomic():
        outbox.publish(tenant, "run.updated", {})
        raise RuntimeError("producer failed")

    assert rings(bell, SILENCE) == []
    # The subscription is live: a committed publish right after does ring.
    outbox.publish(tenant, "run.updated", {})
    assert len(rings(bell, 5)) == 1


def test_doorbell__failed_publish_rings_nothing(bell, tenant_factory):
    tenant = tenant_factory("acme")

    with pytest.raises(exceptions.InvalidEventType):
        outbox.publish(tenant, "Bad Type", {})

    assert rings(bell, SILENCE) == []
