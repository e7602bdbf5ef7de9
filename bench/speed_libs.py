"""Libraries made for speed (issue 17, 6): the standard library's json and asyncio's own loop
against orjson, msgspec and uvloop, on the backplane's own work, in one run.

JSON and msgpack (CPU, one core, µs per call; the median of ``--repeat`` rounds, each
candidate's calls alternating with the others'):

- ``payload``: a producer's payload → compact JSON text (``backplane.events.encode``'s job);
  orjson/msgspec turn NaN into ``null`` where the backplane must refuse it, so the orjson
  candidate is what would keep the contract: orjson, and the standard library again whenever
  its output holds ``null`` or orjson refuses the value (non-string keys, big integers);
- ``frame``: the relay's ``event`` frame around a stored payload (``protocol.event_frame``);
- ``parse``: a peer's inbound frame (``protocol.parse_frame``), and whether each parser
  refuses what the protocol refuses (NaN, Infinity, nesting past the parser, big numbers);
- ``msgpack``: a 1-event and a 250-event ``bp.batch`` packed and unpacked (the Redis message).

Event loops (``--loops``): for asyncio and uvloop, each in a fresh process, alternating:

- ``turn_us``: a ``call_soon`` chain, µs per callback (a loop turn's fixed cost);
- ``hop p50/p99``: the relay → edge hop on the real Redis, as ``encryption_cost.py`` times
  it (pipelined publish of a sealed 1-event batch → received and decoded by the pub/sub layer);
- ``edge_max_rate``: sealed messages the pub/sub layer receives and decodes per second.

With ``--e2e``, also the whole cluster on each loop: ``bench/e2e_latency.py --only e2e`` with
``BACKPLANE_EVENT_LOOP=asyncio`` and ``uvloop`` (relay and edges), alternating ``--e2e-repeat``
times; its own result files are left as they were.

    .venv/bin/python bench/speed_libs.py [--repeat 5] [--loops-repeat 3] [--e2e [--rates 500,2000]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import encryption_cost  # noqa: E402  (the relay → edge hop, measured the same way)

from backplane import protocol  # noqa: E402

PAYLOAD = {
    "run_id": "r-0001",
    "status": "running",
    "step": 7,
    "progress": 0.4375,
    "labels": ["a", "b", "c"],
    "note": "ünïcode " + "x" * 120,
    "nested": {"ok": True, "count": 12, "items": [{"n": i, "v": i * 1.5} for i in range(5)]},
}
PAYLOAD_JSON = json.dumps(PAYLOAD, separators=(",", ":"), ensure_ascii=False)
FRAME_ARGS = (
    "device",
    "abcd1234",
    12345,
    "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "run.updated",
    "2026-01-01T00:00:00Z",
)
INBOUND = (
    '{"type":"resume","streams":{"tenant":{"epoch":"abcd1234","offset":12},'
    '"role":{"epoch":"abcd1234","offset":3},"device":{"epoch":"abcd1234","offset":99}}}'
)
# What the protocol refuses with 4400, and a frame it takes.
PARSE_CASES = {
    "NaN": '{"type":"ping","x":NaN}',
    "-Infinity": '{"type":"ping","x":-Infinity}',
    "nested 50 000 deep": "[" * 50_000 + "]" * 50_000,
    "not an object": "[1,2]",
    "ok": '{"type":"ping"}',
}


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


# --- candidates -----------------------------------------------------------------------------


def payload_candidates() -> dict[str, Callable[[], Any]]:
    import orjson

    from backplane import events, secrets

    def orjson_keeping_the_contract() -> str:
        try:
            out = orjson.dumps(PAYLOAD, default=secrets.json_default)
        except (TypeError, orjson.JSONEncodeError):
            return events.encode(PAYLOAD)
        if b"null" in out:  # maybe a NaN orjson wrote as null: the standard library decides
            return events.encode(PAYLOAD)
        return out.decode()

    import msgspec

    enc = msgspec.json.Encoder()
    return {
        "json (events.encode)": lambda: events.encode(PAYLOAD),
        "orjson (+ json when null)": orjson_keeping_the_contract,
        "msgspec (no NaN check)": lambda: enc.encode(PAYLOAD).decode(),
    }


def frame_candidates() -> dict[str, Callable[[], Any]]:
    import msgspec
    import orjson

    def with_orjson() -> str:
        stream, epoch, offset, eid, etype, occurred = FRAME_ARGS
        return orjson.dumps(
            {
                "type": "event",
                "stream": stream,
                "epoch": epoch,
                "offset": offset,
                "event": {
                    "event_id": eid,
                    "type": etype,
                    "occurred_at": occurred,
                    "payload": orjson.Fragment(PAYLOAD_JSON),
                },
            }
        ).decode()

    enc = msgspec.json.Encoder()

    def with_msgspec() -> str:
        stream, epoch, offset, eid, etype, occurred = FRAME_ARGS
        return enc.encode(
            {
                "type": "event",
                "stream": stream,
                "epoch": epoch,
                "offset": offset,
                "event": {
                    "event_id": eid,
                    "type": etype,
                    "occurred_at": occurred,
                    "payload": msgspec.Raw(PAYLOAD_JSON.encode()),
                },
            }
        ).decode()

    assert json.loads(with_orjson()) == json.loads(with_msgspec()) == json.loads(current_frame())
    return {"json (protocol.event_frame)": current_frame, "orjson": with_orjson, "msgspec": with_msgspec}


def current_frame() -> str:
    return protocol.event_frame(*FRAME_ARGS, PAYLOAD_JSON)


def parsers() -> dict[str, Callable[[str], Any]]:
    import msgspec
    import orjson

    return {
        "json (protocol.parse_frame)": protocol.parse_frame,
        "orjson": orjson.loads,
        "msgspec": msgspec.json.decode,
    }


def refuses(parse: Callable[[str], Any], text: str) -> bool:
    try:
        out = parse(text)
    except Exception:
        return True
    return not isinstance(out, dict)


def msgpack_candidates(size: int) -> dict[str, Callable[[], Any]]:
    import msgpack
    import msgspec

    message = {
        "type": "bp.batch",
        "stream": "d:00000000000000000000000000000000:dev-1",
        "epoch": "abcd1234",
        "items": [[n, current_frame()] for n in range(size)],
    }
    packed = msgpack.packb(message)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    assert dec.decode(packed) == msgpack.unpackb(packed) == message
    return {
        "msgpack": lambda: msgpack.unpackb(msgpack.packb(message)),
        "msgspec": lambda: dec.decode(enc.encode(message)),
    }


def compare(label: str, candidates: dict[str, Callable[[], Any]], calls: int, repeat: int) -> list[dict[str, Any]]:
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            timings[name].append(per_call_us(fn, calls))
    base = statistics.median(next(iter(timings.values())))
    rows = []
    for name, ts in timings.items():
        us = statistics.median(ts)
        rows.append({"work": label, "candidate": name, "us_per_call": us, "vs_stdlib": us / base})
    return rows


# --- event loops ------------------------------------------------------------------------------


async def loop_figures(samples: int, burst: int) -> dict[str, Any]:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from backplane.conf import channel_layers
    from backplane.vendor.channels_redis import PubSubPublisher

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    n, left = 200_000, [200_000]

    def step() -> None:
        left[0] -= 1
        if left[0]:
            loop.call_soon(step)
        else:
            done.set_result(None)

    started = time.perf_counter()
    loop.call_soon(step)
    await done
    row: dict[str, Any] = {"turn_us": (time.perf_counter() - started) / n * 1e6}

    keys = ["tyrum-bench-redis-key-new-0123456789abcdef"]
    config = channel_layers(common.REDIS_URL, prefix=common.prefix("loops"), keys=keys)["default"]["CONFIG"]
    relay, edge = RedisPubSubChannelLayer(**config), RedisPubSubChannelLayer(**config)
    channel = await edge.new_channel()
    group = "bp.speed-libs"
    await edge.group_add(group, channel)
    publisher = PubSubPublisher.for_layer(relay, common.REDIS_URL, 5.0)
    assert publisher is not None
    one = {"type": "bp.batch", "stream": "d:x:dev-1", "epoch": "abcd1234", "items": [[1, current_frame()]]}
    try:
        row.update(await encryption_cost.hop_and_max_rate(relay, edge, publisher, channel, group, one, samples, burst))
    finally:
        await publisher.aclose()
        await edge.flush()
        await relay.flush()
    return row


def loop_child(kind: str, samples: int, burst: int) -> None:
    """(A fresh process) the loop figures on ``kind``'s loop, as one JSON line."""
    if kind == "uvloop":
        import uvloop

        result = uvloop.run(loop_figures(samples, burst))
    else:
        result = asyncio.run(loop_figures(samples, burst))
    print(json.dumps(result))


def compare_loops(repeat: int, samples: int, burst: int) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {"asyncio": [], "uvloop": []}
    for _ in range(repeat):
        for kind in runs:
            out = subprocess.run(  # noqa: S603 - this script
                [sys.executable, __file__, "--loop-child", kind, "--samples", str(samples), "--burst", str(burst)],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for kind, measured in runs.items():
        rows.append({"loop": kind, **{c: statistics.median(r[c] for r in measured) for c in measured[0]}})
    rows.append({"loop": "uvloop / asyncio", **{c: rows[1][c] / rows[0][c] for c in rows[0] if c != "loop"}})
    return rows


def report_e2e(rows: list[dict[str, Any]], repeat: int) -> None:
    common.report(
        f"e2e (bench/e2e_latency.py --only e2e) per event loop, alternating, {repeat} rounds",
        rows,
        ["loop", "round", "rate", "p50_ms", "p99_ms", "p50_assigned_to_peer_ms", "cpu_edges", "cpu_relay", "lost"],
    )


def e2e(args: argparse.Namespace) -> list[dict[str, Any]]:
    """e2e_latency.py's e2e phase on asyncio's loop and on uvloop, alternating; its result
    files are restored."""
    saved = common.RESULTS / "e2e_latency.json"
    aside = common.RESULTS / "e2e_latency.json.speed-libs-aside"
    if saved.exists():
        shutil.move(saved, aside)
    rows = []
    try:
        for i in range(args.e2e_repeat):
            for loop in ("asyncio", "uvloop"):
                argv = [sys.executable, str(Path(__file__).with_name("e2e_latency.py")), "--only", "e2e"]
                argv += ["--peers", str(args.peers), "--rates", args.rates, "--escalate", "0"]
                argv += ["--seconds", str(args.seconds)]
                env = {**os.environ, "BACKPLANE_EVENT_LOOP": loop}
                subprocess.run(argv, env=env, check=True, timeout=1800)  # noqa: S603 - our own script
                for r in json.loads(saved.read_text())["rows"]:
                    rows.append(
                        {
                            "loop": loop,
                            "round": i + 1,
                            "rate": r["rate"],
                            "p50_ms": r["p50_ms"],
                            "p99_ms": r["p99_ms"],
                            "p50_assigned_to_peer_ms": r.get("p50_assigned_to_peer_ms"),
                            "cpu_edges": r.get("cpu_edges"),
                            "cpu_relay": r.get("cpu_relay"),
                            "lost": r["lost"],
                        }
                    )
    finally:
        saved.unlink(missing_ok=True)
        if aside.exists():
            shutil.move(aside, saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--loops-repeat", type=int, default=3, help="0: no event-loop comparison")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=20000)
    parser.add_argument("--e2e", action="store_true", help="also e2e_latency.py's e2e phase on each loop")
    parser.add_argument("--e2e-repeat", type=int, default=2)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rates", default="500,2000")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--only-e2e", action="store_true", help="skip the micro-benchmarks")
    parser.add_argument("--loop-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_child:
        loop_child(args.loop_child, args.samples, args.burst)
        return
    print(common.machine_line(), flush=True)
    if args.only_e2e:
        rows = e2e(args)
        report_e2e(rows, args.e2e_repeat)
        print(f"wrote {common.write('speed_libs_e2e', rows)}")
        return
    rows = compare("payload", payload_candidates(), 20000, args.repeat)
    rows += compare("frame", frame_candidates(), 20000, args.repeat)
    inbound = {name: (lambda p=p: p(INBOUND)) for name, p in parsers().items()}
    rows += compare("parse", inbound, 20000, args.repeat)
    rows += compare("msgpack 1", msgpack_candidates(1), 20000, args.repeat)
    rows += compare("msgpack 250", msgpack_candidates(250), 200, args.repeat)
    common.report(
        f"JSON and msgpack: µs per call (median of {args.repeat}); vs_stdlib = candidate / the current code",
        rows,
        ["work", "candidate", "us_per_call", "vs_stdlib"],
    )
    refusals = [
        {"parser": name, **{case: refuses(p, text) for case, text in PARSE_CASES.items()}}
        for name, p in parsers().items()
    ]
    refusals.append({"parser": "(4400 wants)", **{case: case != "ok" for case in PARSE_CASES}})
    common.report("inbound frames refused (yes) or taken (NO)", refusals, ["parser", *PARSE_CASES])
    extra: dict[str, Any] = {"refusals": refusals}
    if args.loops_repeat:
        extra["loops"] = compare_loops(args.loops_repeat, args.samples, args.burst)
        common.report(
            f"event loops (a fresh process each, alternating, median of {args.loops_repeat})",
            extra["loops"],
            ["loop", "turn_us", "hop_p50_ms", "hop_p99_ms", "edge_max_rate"],
        )
    if args.e2e:
        extra["e2e"] = e2e(args)
        report_e2e(extra["e2e"], args.e2e_repeat)
    assert not math.isnan(rows[0]["us_per_call"])
    print(f"wrote {common.write('speed_libs', rows, extra)}")


if __name__ == "__main__":
    main()
