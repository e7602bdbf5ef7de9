"""Compaction: delete forwarded rows past retention (database clock), never unforwarded ones."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import override_settings

from backplane import outbox, retention, streams
from backplane.conf import conf
from backplane.models import OutboxItem, Stream
from backplane.store import OUTBOX, get_store

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HOUR = 3600.0
OLD = ["e0", "e1", "e2", "e4"]  # aged two days
FORWARDED = ["e0", "e1", "e2", "e3"]


def age(event_ids: list[str], interval: str = "2 days") -> None:
    with connection.cursor() as cur:
        cur.execute(
            f"UPDATE {OUTBOX} SET created_at = now() - %s::interval WHERE event_id = ANY(%s)",
            [interval, event_ids],
        )


@pytest.fixture
def stream_key(tenant_factory) -> str:
    """Six events at offsets 1..6: e0-e2 old and forwarded, e3 new and forwarded,
    e4 old and not forwarded, e5 new and not forwarded."""
    tenant = tenant_factory("acme")
    for n in range(6):
        outbox.publish(tenant, "run.updated", {"n": n}, event_id=f"e{n}")
    assert len(get_store().assign(list(range(conf.SHARDS)), 100)) == 6
    get_store().mark_forwarded(list(OutboxItem.objects.filter(event_id__in=FORWARDED).values_list("id", flat=True)))
    age(OLD)
    return streams.tenant_stream(tenant.id)


def remaining() -> list[str]:
    return sorted(OutboxItem.objects.values_list("event_id", flat=True))


def test_compact__deletes_only_old_forwarded_rows(stream_key):
    result = retention.compact(HOUR)

    assert (result.deleted, result.unforwarded_expired) == (3, 1)
    assert remaining() == ["e3", "e4", "e5"]


def test_compact__records_first_retained_offset(stream_key):
    retention.compact(HOUR)

    assert Stream.objects.get(key=stream_key).first_retained_offset == 4
    assert [i.offset for i in get_store().read_range(stream_key, 0, 100)] == [4, 5, 6]
    assert get_store().stream_heads([stream_key])[stream_key].first_retained == 4


def test_compact__dry_run_counts_and_deletes_nothing(stream_key):
    result = retention.compact(HOUR, dry_run=True)

    assert (result.deleted, result.unforwarded_expired, result.batches) == (3, 1, 0)
    assert remaining() == [f"e{n}" for n in range(6)]
    assert Stream.objects.get(key=stream_key).first_retained_offset == 1


def test_compact__never_deletes_unforwarded_however_old(stream_key):
    age(["e5"], "400 days")

    result = retention.compact(HOUR)

    assert (result.deleted, result.unforwarded_expired) == (3, 2)
    assert remaining() == ["e3", "e4", "e5"]


def test_compact__in_bounded_batches(stream_key):
    result = retention.compact(HOUR, batch_size=2)

    assert (result.deleted, result.batches) == (3, 2)
    assert remaining() == ["e3", "e4", "e5"]


def test_compact__max_batches_stops_early(stream_key):
    result = retention.compact(HOUR, batch_size=1, max_batches=2)

    assert (result.deleted, result.batches) == (2, 2)
    assert remaining() == ["e2", "e3", "e4", "e5"]
    assert Stream.objects.get(key=stream_key).first_retained_offset == 3


def test_compact__nothing_inside_the_window(stream_key):
    result = retention.compact(3 * 24 * HOUR)

    assert (result.deleted, result.unforwarded_expired) == (0, 0)
    assert len(remaining()) == 6
    assert Stream.objects.get(key=stream_key).first_retained_offset == 1


def test_compact__default_retention_from_settings(stream_key):
    with override_settings(BACKPLANE={"RETENTION_SECS": HOUR}):
        assert retention.compact().deleted == 3
    assert remaining() == ["e3", "e4", "e5"]


def test_compact__first_retained_offset_never_moves_back(stream_key):
    retention.compact(HOUR)
    Stream.objects.filter(key=stream_key).update(first_retained_offset=10)
    age(["e3"])

    retention.compact(HOUR)

    assert remaining() == ["e4", "e5"]
    assert Stream.objects.get(key=stream_key).first_retained_offset == 10
