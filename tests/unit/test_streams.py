"""Unit tests of ``backplane.streams``: keys, group names, shards, frames, delivery plans.

Hypothesis runs without a per-example deadline: timing varies on a loaded CI machine.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from backplane import streams
from backplane.streams import Item

GROUP_RE = re.compile(r"^[A-Za-z0-9._-]+$")
TENANT = uuid.UUID("12345678-1234-5678-1234-567812345678")

device_ids = st.from_regex(streams.DEVICE_ID_RE, fullmatch=True)
edge_ids = st.from_regex(streams.EDGE_ID_RE, fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


# --- stream keys ------------------------------------------------------------------------


def test_stream_keys__one_per_audience_with_its_audience():
    keys = streams.connection_streams(TENANT, "node", "dev-1")

    assert keys == {
        "tenant": f"t:{TENANT.hex}",
        "role": f"r:{TENANT.hex}:node",
        "device": f"d:{TENANT.hex}:dev-1",
    }
    assert {name: streams.audience_of(key) for name, key in keys.items()} == {
        "tenant": "tenant",
        "role": "role",
        "device": "device",
    }
    assert streams.audience_of(streams.edge_stream("edge-a")) == "edge"


@settings(deadline=None)
@given(a=st.uuids(), b=st.uuids(), device=device_ids, role=st.sampled_from(streams.ROLES))
def test_stream_keys__tenants_never_share_a_stream(a, b, device, role):
    assume(a != b)
    keys_a = set(streams.connection_streams(a, role, device).values())
    keys_b = set(streams.connection_streams(b, role, device).values())

    assert not keys_a & keys_b
    assert len(keys_a) == 3


# --- group names ------------------------------------------------------------------------


@settings(deadline=None)
@given(prefix=st.text(max_size=80), tenant=st.uuids(), device=device_ids, role=st.sampled_from(streams.ROLES))
def test_group_name__allowed_chars_and_short_for_any_device(prefix, tenant, device, role):
    for key in streams.connection_streams(tenant, role, device).values():
        group = streams.group_name(prefix, key)

        assert GROUP_RE.match(group), group
        assert len(group) < 100


@settings(deadline=None)
@given(a=st.text(min_size=1), b=st.text(min_size=1))
def test_group_name__distinct_stream_keys_give_distinct_groups(a, b):
    assume(a != b)

    assert streams.group_name("tyrum", a) != streams.group_name("tyrum", b)


def test_group_name__prefix_separates_deployments():
    key = streams.tenant_stream(TENANT)

    assert streams.group_name("prod", key) != streams.group_name("staging", key)
    assert streams.group_name("", key).startswith("bp.tyrum.")


@settings(deadline=None)
@given(prefix=st.text(max_size=80), edge=edge_ids)
def test_edge_group__allowed_chars_and_short(prefix, edge):
    group = streams.edge_group(prefix, edge)

    assert GROUP_RE.match(group), group
    assert len(group) < 100


def test_edge_group__distinct_edges_give_distinct_groups():
    prefix = "p" * 30
    a, b = "e" * 63 + "1", "e" * 63 + "2"
    assert streams.EDGE_ID_RE.match(a) and streams.EDGE_ID_RE.match(b)

    assert streams.edge_group(prefix, a) != streams.edge_group(prefix, b)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        pytest.param(streams.DEVICE_ID_RE, "dev-1\n", id="device"),
        pytest.param(streams.EDGE_ID_RE, "edge-1\n", id="edge"),
        pytest.param(streams.EVENT_TYPE_RE, "run.updated\n", id="type"),
        pytest.param(streams.EVENT_ID_RE, "e-1\n", id="event-id"),
    ],
)
def test_id_patterns__reject_trailing_newline(pattern, value):
    assert pattern.match(value) is None


# --- shards -----------------------------------------------------------------------------


def test_shard_of__pinned_values():
    # Changing the hash would move every tenant to another relay shard on upgrade.
    assert streams.shard_of(TENANT, 1000) == 872
    assert streams.shard_of(uuid.UUID("00000000-0000-0000-0000-000000000001"), 16) == 3
    assert streams.shard_of(uuid.UUID("9f1c2a7e-0000-4000-8000-c0ffee012345"), 16) == 9


@settings(deadline=None)
@given(tenant=st.uuids(), shards=st.integers(min_value=1, max_value=4096))
def test_shard_of__stable_and_in_range(tenant, shards):
    shard = streams.shard_of(tenant, shards)

    assert 0 <= shard < shards
    assert streams.shard_of(uuid.UUID(str(tenant)), shards) == shard


def test_shard_of__spreads_tenants():
    seen = {streams.shard_of(uuid.UUID(int=i * 7919 + 1), 16) for i in range(400)}

    assert len(seen) == 16


# --- parse_shards -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, list(range(8))),
        ("", list(range(8))),
        ("0-3,7", [0, 1, 2, 3, 7]),
        (" 5 , 1 ", [1, 5]),
        ("1,1-2,2", [1, 2]),
        ("7", [7]),
        ("0-7", list(range(8))),
    ],
)
def test_parse_shards__ranges_and_lists(spec, expected):
    assert streams.parse_shards(spec, 8) == expected


@pytest.mark.parametrize("spec", ["8", "0-8", "x", "1-x", "-1", "1-2-3", "1.5", "0x1"])
def test_parse_shards__bad_input_raises_value_error(spec):
    with pytest.raises(ValueError):
        streams.parse_shards(spec, 8)


@pytest.mark.parametrize("spec", ["3-1", ",", " , "])
def test_parse_shards__spec_selecting_no_shard_raises(spec):
    with pytest.raises(ValueError):
        streams.parse_shards(spec, 8)


# --- event frames -----------------------------------------------------------------------


@settings(deadline=None)
@given(
    stream=st.sampled_from(streams.STREAM_NAMES),
    epoch=st.text(),
    offset=st.integers(min_value=1, max_value=2**62),
    event_id=st.text(),
    etype=st.text(),
    occurred_at=st.text(),
    payload=json_values,
)
def test_event_frame__valid_json_with_exactly_protocol_fields(
    stream, epoch, offset, event_id, etype, occurred_at, payload
):
    item = Item(offset, event_id, etype, occurred_at, json.dumps(payload))

    frame = json.loads(streams.event_frame(stream, epoch, item))

    assert set(frame) == {"type", "stream", "epoch", "offset", "event"}
    assert set(frame["event"]) == {"event_id", "type", "occurred_at", "payload"}
    assert frame["type"] == "event"
    assert (frame["stream"], frame["epoch"], frame["offset"]) == (stream, epoch, offset)
    assert frame["event"] == {"event_id": event_id, "type": etype, "occurred_at": occurred_at, "payload": payload}


def test_event_frame__matches_protocol_example():
    item = Item(8, "e-1", "run.updated", "2026-11-26T20:00:00Z", '{"run_id": "r1", "status": "running"}')

    assert json.loads(streams.event_frame("device", "c0ffee01", item)) == {
        "type": "event",
        "stream": "device",
        "epoch": "c0ffee01",
        "offset": 8,
        "event": {
            "event_id": "e-1",
            "type": "run.updated",
            "occurred_at": "2026-11-26T20:00:00Z",
            "payload": {"run_id": "r1", "status": "running"},
        },
    }
