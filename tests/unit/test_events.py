"""Unit tests of ``backplane.events``: event ids, encoding, audiences and row building (no database).

Hypothesis runs without a per-example deadline: timing varies on a loaded CI machine.
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backplane import events, exceptions, redaction, streams
from backplane.events import build, build_all, encode, first_of_each, new_event_ids, stream_for

TENANT = uuid.UUID("12345678-1234-5678-1234-567812345678")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PATTERNS = redaction.normalise_patterns(["password", "token", "api_key"])
CAP = 64 * 1024

texts = st.text(st.characters(exclude_characters="\x00"))  # a NUL is refused: tested on its own
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)


def make(spec: dict, *, cap: int = CAP, new_id: str = "made-1") -> tuple:  # type: ignore[type-arg]
    return build(TENANT, spec, PATTERNS, new_id, NOW, cap)


# --- event ids --------------------------------------------------------------------------------


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


def test_new_event_ids__one_at_a_time_is_the_same_kind_of_id() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_event_ids(1)[0] for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 7 and value.variant == uuid.RFC_4122 and str(value) == text
        assert before <= value.int >> 80 <= after
    assert {text[-1] for text in ids} == set("0123456789abcdef")
    assert {text[15] for text in ids} == set("0123456789abcdef")


@settings(deadline=None, max_examples=50)
@given(st.integers(min_value=0, max_value=300))
def test_new_event_ids__any_count_gives_that_many_distinct_valid_event_ids(n: int) -> None:
    ids = new_event_ids(n)
    assert len(ids) == len(set(ids)) == n
    assert all(uuid.UUID(i).version == 7 and streams.EVENT_ID_RE.match(i) for i in ids)


def test_new_event_ids__later_calls_sort_after_earlier_ones() -> None:
    first = new_event_ids(3)
    time.sleep(0.002)
    second = new_event_ids(3)
    assert max(first) < min(second)


def test_new_event_ids__one_at_a_time_across_many_pool_refills_never_repeats(monkeypatch) -> None:
    """publish()'s ids come from a pool of random bytes read 4 KiB at a time: every 16 bytes
    are handed out once, refill after refill."""
    reads: list[int] = []
    real = events.os.urandom
    monkeypatch.setattr(events.os, "urandom", lambda n: reads.append(n) or real(n))
    events._pool.clear()
    ids = [new_event_ids(1)[0] for _ in range(5 * 256 + 3)]
    assert len(set(ids)) == len(ids)
    assert len({uuid.UUID(i).int & (2**62 - 1) for i in ids}) == len(ids)  # the random bits differ
    assert reads == [4096] * 6  # one read of the OS per 256 ids


def test_new_event_ids__a_refill_emptied_at_once_by_other_threads_still_gives_an_id(monkeypatch) -> None:
    class Raided(list):
        def extend(self, items: object) -> None:  # other threads take every refilled id at once
            list(items)

    monkeypatch.setattr(events, "_pool", Raided())
    ids = [new_event_ids(1)[0] for _ in range(3)]
    assert len(set(ids)) == 3 and all(uuid.UUID(i).version == 7 for i in ids)


def test_new_event_ids__a_forked_child_does_not_make_its_parents_next_ids() -> None:
    events._pool.clear()
    new_event_ids(1)  # the pool holds 255 ids' bytes now
    assert len(events._pool) == 255
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent, and leave at once
        try:
            os.close(read)
            os.write(write, "\n".join(new_event_ids(1)[0][-17:] for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    parent = {new_event_ids(1)[0][-17:] for _ in range(10)}  # the random tails alone
    assert len(child) == 10 and not child & parent


def test_new_event_ids__none() -> None:
    assert new_event_ids(0) == []


# --- encoding ---------------------------------------------------------------------------------


@settings(deadline=None)
@given(json_values)
def test_encode__compact_json_that_reads_back_as_given(value: object) -> None:
    text = encode(value)
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(text) == value


@settings(deadline=None)
@given(st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(min_value=0, max_value=2))
def test_encode__nan_and_infinity_are_invalid_payloads(bad: float, depth: int) -> None:
    value: object = bad
    for _ in range(depth):
        value = {"x": [value]}
    with pytest.raises(exceptions.InvalidPayload):
        encode(value)


@settings(deadline=None)
@given(st.text(), st.text(), st.booleans())
def test_encode__a_nul_character_anywhere_is_an_invalid_payload(before: str, after: str, in_key: bool) -> None:
    text = f"{before}\x00{after}"
    with pytest.raises(exceptions.InvalidPayload):
        encode({text: 1} if in_key else {"k": [text]})


@pytest.mark.parametrize("text", ["\\u0000", "\\\\u0000", "a\\u0000b"])
def test_encode__backslash_u0000_as_text_is_no_nul(text: str) -> None:
    assert json.loads(encode({"note": text})) == {"note": text}


def test_encode__not_json_is_an_invalid_payload() -> None:
    with pytest.raises(exceptions.InvalidPayload):
        encode({"when": NOW})


# --- audiences --------------------------------------------------------------------------------


def test_stream_for__device_role_or_the_whole_tenant() -> None:
    assert stream_for(TENANT, "node-7:x@y", None) == streams.device_stream(TENANT, "node-7:x@y")
    assert stream_for(TENANT, None, "operator") == streams.role_stream(TENANT, "operator")
    assert stream_for(TENANT, None, None) == streams.tenant_stream(TENANT)


@pytest.mark.parametrize(("device", "role"), [("d-1", "client"), ("bad device", None), (7, None), (None, "admin")])
def test_stream_for__both_or_a_malformed_audience_is_invalid(device: object, role: object) -> None:
    with pytest.raises(exceptions.InvalidAudience):
        stream_for(TENANT, device, role)  # type: ignore[arg-type]


# --- building rows ----------------------------------------------------------------------------


def test_build__a_row_of_stream_id_type_time_json_and_bytes() -> None:
    row = make({"type": "run.updated", "payload": {"é": 1}, "device": "d-1"})
    assert row == (streams.device_stream(TENANT, "d-1"), "made-1", "run.updated", NOW, '{"é":1}', 8)


def test_build__explicit_event_id_and_occurred_at_are_kept() -> None:
    at = NOW - timedelta(days=1)
    row = make({"type": "a.b", "payload": 1, "event_id": "run-1:v2", "occurred_at": at})
    assert (row[1], row[3]) == ("run-1:v2", at)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"type": "a.b", "payload": 1, "colour": "red"}, exceptions.PublishError),
        ({"type": "Not A Type", "payload": 1}, exceptions.InvalidEventType),
        ({"payload": 1}, exceptions.InvalidEventType),
        ({"type": "a.b", "payload": 1, "event_id": "has space"}, exceptions.InvalidEventId),
        ({"type": "a.b", "payload": 1, "event_id": 12}, exceptions.InvalidEventId),
        ({"type": "a.b", "payload": 1, "occurred_at": datetime(2026, 1, 1)}, exceptions.PublishError),
        ({"type": "a.b", "payload": 1, "occurred_at": "2026-01-01"}, exceptions.PublishError),
        ({"type": "a.b", "payload": {"x": float("nan")}}, exceptions.InvalidPayload),
        ({"type": "a.b", "payload": 1, "device": "d", "role": "node"}, exceptions.InvalidAudience),
    ],
)
def test_build__bad_input_raises_its_named_error(spec: dict, error: type[Exception]) -> None:  # type: ignore[type-arg]
    with pytest.raises(error):
        make(spec)


def test_build__a_non_json_value_under_a_secret_key_is_still_refused() -> None:
    """Encoded before redaction: a redacted key must not hide a payload that is not JSON."""
    with pytest.raises(exceptions.InvalidPayload):
        make({"type": "a.b", "payload": {"token": object()}})


@settings(deadline=None)
@given(st.text(st.characters(exclude_characters="\x00"), min_size=1), st.integers(min_value=40, max_value=200))
def test_build__redaction_comes_before_the_size_cap(secret: str, cap: int) -> None:
    """A payload that is too large only because of a secret's value is stored redacted."""
    payload = {"api_key": secret * cap, "ok": 1}
    original = copy.deepcopy(payload)
    row = make({"type": "a.b", "payload": payload}, cap=cap)
    assert json.loads(row[4]) == {"api_key": redaction.REDACTED, "ok": 1}
    assert row[5] == len(row[4].encode()) <= cap
    assert payload == original  # the caller's payload is not changed


@settings(deadline=None)
@given(st.text(alphabet="aé€😀", min_size=1, max_size=40))
def test_build__the_cap_counts_utf8_bytes(text: str) -> None:
    size = len(json.dumps(text, ensure_ascii=False).encode())
    assert make({"type": "a.b", "payload": text}, cap=size)[5] == size
    with pytest.raises(exceptions.PayloadTooLarge):
        make({"type": "a.b", "payload": text}, cap=size - 1)


def test_build_all__made_ids_differ_and_a_bad_event_raises_only_when_reached() -> None:
    specs = [{"type": "a.b", "payload": n} for n in range(3)] + [{"type": "Bad", "payload": 3}]
    rows = build_all(TENANT, specs, PATTERNS, NOW, CAP)
    first = [next(rows) for _ in range(3)]
    assert len({r[1] for r in first}) == 3 and all(uuid.UUID(r[1]).version == 7 for r in first)
    assert {r[3] for r in first} == {NOW}  # one default time for the call
    with pytest.raises(exceptions.InvalidEventType):
        next(rows)


def test_first_of_each__a_repeated_event_id_is_one_event_across_calls() -> None:
    rows = [make({"type": "a.b", "payload": n, "event_id": eid}) for n, eid in enumerate("abac")]
    seen: set[str] = set()
    assert [r[4] for r in first_of_each(rows[:2], seen)] == ["0", "1"]
    assert [r[4] for r in first_of_each(rows[2:], seen)] == ["3"]
