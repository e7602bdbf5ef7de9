"""protocol.py renders and parses with orjson when it is installed (the server pins it) and
with json otherwise (the SDK): the same frames, the same 4400 refusals either way."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backplane import protocol
from backplane.protocol import Close, FrameRejected, Position

PARSERS = [protocol._json_loads, protocol._loads]
PAYLOADS = ['{"n":1}', '{"note":"ünï\\u00e9 \\"q\\"","xs":[1,2.5,null,true],"o":{}}', "[]", '"s"', "17"]


def test_the_server_uses_orjson() -> None:
    import orjson

    assert protocol._loads is orjson.loads
    assert protocol._event_frame is protocol._orjson_event_frame
    assert protocol._compact is protocol._orjson_compact


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("offset", [0, 1, 2**53 + 1, 2**63 - 1])
def test_event_frame__same_bytes_with_orjson_and_json(payload: str, offset: int) -> None:
    args = ("device", "abcd1234", offset, "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "run.updated", "2026-01-01T00:00:00Z")
    rendered = protocol._orjson_event_frame(*args, payload)
    assert rendered == protocol._json_event_frame(*args, payload)
    frame = json.loads(rendered)
    assert frame["offset"] == offset and frame["event"]["payload"] == json.loads(payload)


def test_other_frames__same_bytes_with_orjson_and_json() -> None:
    heads = {"tenant": Position("e1", 3), "device": Position("e2", 0)}
    obj: dict[str, Any] = json.loads(protocol.hello_frame("c1", "edge-a", heads))
    assert protocol._orjson_compact(obj) == protocol._json_compact(obj)
    resumed = {"type": "resumed", "streams": {"tenant": protocol.recovered(2)}}
    assert protocol._orjson_compact(resumed) == protocol._json_compact(resumed)


@pytest.mark.parametrize("loads", PARSERS, ids=["json", "orjson"])
@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping","x":NaN}',
        '{"type":"ping","x":Infinity}',
        '{"type":"ping","x":-Infinity}',
        "[" * 50_000 + "]" * 50_000,
        '{"type":"ping"',
        "[1,2]",
        '{"type":7}',
        '{"no_type":"ping"}',
        "",
    ],
)
def test_parse_frame__refuses_with_4400_whichever_parser(loads: Any, text: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(protocol, "_loads", loads)
    with pytest.raises(FrameRejected) as refused:
        protocol.parse_frame(text)
    assert refused.value.code == Close.MALFORMED_FRAME


@pytest.mark.parametrize("loads", PARSERS, ids=["json", "orjson"])
def test_parse_frame__takes_the_same_frames_whichever_parser(loads: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(protocol, "_loads", loads)
    text = '{"type":"resume","streams":{"device":{"epoch":"e1","offset":12}},"note":"ü"}'
    assert protocol.parse_frame(text) == json.loads(text)
    assert protocol.resume_positions(protocol.parse_frame(text)) == {"device": Position("e1", 12)}
