"""What encrypting Redis costs (issues 13 and 17): the relay → edge hop without keys, with
channels-redis's Fernet, and with the backplane's AES-GCM sealing (``backplane.sealing``,
what the layers use), in one run, on the real Redis.

Each configuration builds the layers ``backplane.conf.channel_layers`` makes: a relay-side
layer whose pipelined publisher (``vendor.channels_redis.PubSubPublisher``, what the relay
sends with) publishes ``bp.batch`` messages of real event frames, and an edge-side pub/sub
layer subscribed to the group, receiving and decoding them as the edge's delivery loop does.

- ``encode_us`` / ``decode_us``: the relay's serialize and the edge's deserialize per message
  (CPU, one core), for a 1-event batch and a 250-event chunk (the relay's largest message);
- ``hop p50/p99``: one 1-event batch at a time, publish → received and decoded at the edge;
- ``edge max rate``: messages the edge-side layer receives and decodes per second, from a
  pipelined burst of already-encoded messages (the relay's encoding is not on the edge's CPU).

The configurations alternate, ``--repeat`` times, and each figure is the median.

With ``--e2e``, also the whole path: ``bench/e2e_latency.py --only e2e`` (its cluster of two
edges, a relay and the peers; commit → frame at the peer, the rate search) once without and
once with keys, one after the other; its own result files are left as they were.

    .venv/bin/python bench/encryption_cost.py [--repeat 3] [--burst 20000] [--e2e [--peers 500]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

from backplane import protocol  # noqa: E402
from backplane.conf import channel_layers  # noqa: E402
from backplane.vendor.channels_redis import PubSubPublisher  # noqa: E402

KEYS = ["tyrum-bench-redis-key-new-0123456789abcdef", "tyrum-bench-redis-key-old-0123456789abcdef"]
GROUP = "bp.encryption-cost"
PAYLOAD = '{"run_id": "r-0001", "status": "running", "step": 7, "note": "' + "x" * 120 + '"}'
TIMEOUT_SECS = 30.0


def batch(size: int) -> dict[str, Any]:
    frames = [
        [
            n,
            protocol.event_frame(
                "device", "abcd1234", n, f"0193-{n:08d}", "run.updated", "2026-01-01T00:00:00Z", PAYLOAD
            ),
        ]
        for n in range(1, size + 1)
    ]
    return {
        "type": "bp.batch",
        "stream": "d:00000000000000000000000000000000:dev-1",
        "epoch": "abcd1234",
        "items": frames,
    }


def per_call_us(fn: Any, arg: Any, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn(arg)
    return (time.perf_counter() - started) / calls * 1e6


# Configurations compared: no keys; channels-redis's own Fernet (what 0024 used); the
# backplane's AES-GCM sealing (backplane.sealing, what channel_layers builds).
CONFIGS = {"no keys": [], "Fernet": KEYS, "AES-GCM": KEYS}


async def hop_and_max_rate(
    relay: Any, edge: Any, publisher: Any, channel: str, group: str, one: dict[str, Any], samples: int, burst: int
) -> dict[str, float]:
    """The relay → edge hop on the real Redis (pipelined publish of ``one`` → received and
    decoded by the edge's layer), p50/p99 over ``samples``; then the edge's maximum receive
    rate over a ``burst`` of already encoded messages (only its receive and decode timed)."""
    while (await publisher.publish_all([(group, one)]))[0] == 0:  # until the edge's subscription is live
        await asyncio.sleep(0.05)
    await asyncio.wait_for(edge.receive(channel), TIMEOUT_SECS)
    hops = []
    for _ in range(samples):
        started = time.perf_counter()
        await publisher.publish_all([(group, one)])
        await asyncio.wait_for(edge.receive(channel), TIMEOUT_SECS)
        hops.append((time.perf_counter() - started) * 1000)
    raw = relay._get_layer()._get_group_channel_name(group)
    token = relay.serialize(one)
    # The burst's messages are already encoded: written by a plain client of their own (the
    # relay's publisher, WirePublisher on a plain URL, takes messages to encode).
    from redis.asyncio import Redis

    client = Redis.from_url(common.REDIS_URL)
    try:
        await client.ping()  # connected before the clock starts
        started = time.perf_counter()
        for start in range(0, burst, 500):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(500, burst - start)):
                pipe.publish(raw, token)
            await pipe.execute()
        for _ in range(burst):
            await asyncio.wait_for(edge.receive(channel), TIMEOUT_SECS)
    finally:
        await client.aclose()
    return {
        "hop_p50_ms": common.percentile(hops, 50),
        "hop_p99_ms": common.percentile(hops, 99),
        "edge_max_rate": burst / (time.perf_counter() - started),
    }


async def measure(config_name: str, prefix: str, samples: int, burst: int) -> dict[str, Any]:
    from channels_redis.pubsub import RedisPubSubChannelLayer

    keys = CONFIGS[config_name]
    config = channel_layers(common.REDIS_URL, prefix=prefix, keys=keys)["default"]["CONFIG"]
    if config_name == "Fernet":
        config["serializer_format"] = "msgpack"  # channels-redis's serializer: Fernet, no age limit
    relay, edge = RedisPubSubChannelLayer(**config), RedisPubSubChannelLayer(**config)
    channel = await edge.new_channel()
    await edge.group_add(GROUP, channel)
    publisher = PubSubPublisher.for_layer(relay, common.REDIS_URL, 5.0)
    assert publisher is not None
    try:
        one, chunk = batch(1), batch(250)
        row: dict[str, Any] = {"keys": len(keys)}
        for name, message, calls in (("1", one, 5000), ("250", chunk, 100)):
            token = relay.serialize(message)
            row[f"encode_us_{name}"] = per_call_us(relay.serialize, message, calls)
            row[f"decode_us_{name}"] = per_call_us(edge.deserialize, token, calls)
            row[f"bytes_{name}"] = len(token)
        row.update(await hop_and_max_rate(relay, edge, publisher, channel, GROUP, one, samples, burst))
        return row
    finally:
        await publisher.aclose()
        await edge.flush()
        await relay.flush()


def e2e(args: argparse.Namespace) -> list[dict[str, Any]]:
    """e2e_latency.py's e2e phase without and with keys; its result files are restored."""
    names = ("e2e_latency", "max_rate")
    saved = {n: common.RESULTS / f"{n}.json" for n in names}
    aside = {n: common.RESULTS / f"{n}.json.encryption-cost-aside" for n in names}
    for n in names:
        if saved[n].exists():
            shutil.move(saved[n], aside[n])
    rows = []
    try:
        for label, env in (
            ("no keys", {"BACKPLANE_REDIS_KEYS": "", "BACKPLANE_REDIS_TRUSTED": "true"}),
            ("keys", {"BACKPLANE_REDIS_KEYS": ",".join(KEYS)}),
        ):
            argv = [sys.executable, str(Path(__file__).with_name("e2e_latency.py")), "--only", "e2e"]
            argv += ["--peers", str(args.peers), "--rates", args.rates, "--seconds", str(args.seconds)]
            subprocess.run(argv, env={**os.environ, **env}, check=True, timeout=1800)
            latency = json.loads(saved["e2e_latency"].read_text())["rows"]
            best = json.loads(saved["max_rate"].read_text())["rows"][0]
            row: dict[str, Any] = {"config": label, "max_sustainable": best["max_sustainable"]}
            for r in latency:
                row[f"p50_ms@{r['rate']:g}"] = r["p50_ms"]
            rows.append(row)
    finally:
        for n in names:
            saved[n].unlink(missing_ok=True)
            if aside[n].exists():
                shutil.move(aside[n], saved[n])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="hops timed one by one per configuration")
    parser.add_argument("--burst", type=int, default=20000, help="messages of the max-rate burst")
    parser.add_argument("--e2e", action="store_true", help="also e2e_latency.py's e2e phase, without and with keys")
    parser.add_argument("--peers", type=int, default=500)
    parser.add_argument("--rates", default="500,2000,5000")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for i in range(args.repeat):
        for name in CONFIGS:
            runs[name].append(asyncio.run(measure(name, common.prefix(f"enc{i}"), args.samples, args.burst)))
    rows = []
    for name, measured in runs.items():
        row: dict[str, Any] = {"config": name if name == "no keys" else f"{len(KEYS)} keys ({name})"}
        for col in measured[0]:
            if col != "keys":
                row[col] = statistics.median(r[col] for r in measured)
        rows.append(row)
    plain, fernet, sealed = rows
    for label, keyed, base in (
        ("Fernet / no keys", fernet, plain),
        ("AES-GCM / no keys", sealed, plain),
        ("AES-GCM / Fernet", sealed, fernet),
    ):
        rows.append({"config": label, **{col: keyed[col] / base[col] for col in base if col != "config" and base[col]}})
    columns = [
        "config",
        "encode_us_1",
        "decode_us_1",
        "bytes_1",
        "encode_us_250",
        "decode_us_250",
        "bytes_250",
        "hop_p50_ms",
        "hop_p99_ms",
        "edge_max_rate",
    ]
    common.report(f"the relay → edge hop without keys, Fernet, AES-GCM (median of {args.repeat})", rows, columns)
    extra: dict[str, Any] = {}
    if args.e2e:
        extra["e2e"] = e2e(args)
        cols = sorted({c for r in extra["e2e"] for c in r} - {"config", "max_sustainable"}, key=lambda c: float(c[7:]))
        common.report(
            "e2e (bench/e2e_latency.py --only e2e): commit → frame", extra["e2e"], ["config", *cols, "max_sustainable"]
        )
        print(common.machine_line())
    print(f"wrote {common.write('encryption_cost', rows, extra)}")


if __name__ == "__main__":
    main()
