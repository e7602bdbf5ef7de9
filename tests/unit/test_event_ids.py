"""Unit tests of the event ids publish_many makes in bulk."""

from __future__ import annotations

import uuid

from backplane.outbox import new_event_ids


def test_new_event_ids__random_version_4_uuids_in_canonical_text() -> None:
    ids = new_event_ids(5000)
    assert len(ids) == len(set(ids)) == 5000
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 4 and value.variant == uuid.RFC_4122
        assert str(value) == text
    # Random bits are random: every hex digit shows up at a free position across many ids.
    assert {text[0] for text in ids} == set("0123456789abcdef")


def test_new_event_ids__none() -> None:
    assert new_event_ids(0) == []
