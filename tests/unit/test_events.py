"""Unit tests of backplane.events: event ids, encoding, validation and row building (no database)."""

from __future__ import annotations

import time
import uuid

from backplane.events import new_event_ids


def test_new_event_ids__time_ordered_version_7_uuids_in_canonical_text() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_event_ids(5000)
    after = time.time_ns() // 1_000_000
    assert len(ids) == len(set(ids)) == 5000
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 7 and value.variant == uuid.RFC_4122
        assert str(value) == text
        # The first 48 bits are the Unix time in milliseconds when they were made.
        assert before <= value.int >> 80 <= after
    # The other free bits are random: every hex digit shows up at a random position.
    assert {text[-1] for text in ids} == set("0123456789abcdef")
    assert {text[15] for text in ids} == set("0123456789abcdef")


def test_new_event_ids__later_calls_sort_after_earlier_ones() -> None:
    first = new_event_ids(3)
    time.sleep(0.002)
    second = new_event_ids(3)
    assert max(first) < min(second)


def test_new_event_ids__none() -> None:
    assert new_event_ids(0) == []
