"""Stream keys, Channels group names, shards and event frames: pure functions.

A *stream* is an audience with its own epoch and contiguous offsets: the whole tenant,
one role in the tenant, or one device. A connection belongs to three streams. Directed
commands use a fourth kind, one stream per edge.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from uuid import UUID

from backplane import protocol

ROLES = ("client", "node", "operator")
STREAM_NAMES = protocol.STREAM_NAMES

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
EDGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+){0,7}\Z")
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}\Z")


def tenant_stream(tenant_id: UUID) -> str:
    return f"t:{tenant_id.hex}"


def role_stream(tenant_id: UUID, role: str) -> str:
    return f"r:{tenant_id.hex}:{role}"


def device_stream(tenant_id: UUID, device_id: str) -> str:
    return f"d:{tenant_id.hex}:{device_id}"


def edge_stream(edge_id: str) -> str:
    return f"e:{edge_id}"


_AUDIENCES = {"t": "tenant", "r": "role", "d": "device", "e": "edge"}


def audience_of(stream_key: str) -> str:
    """Return ``tenant``, ``role``, ``device`` or ``edge`` for a stream key (called per socket
    per batch in the edge's fan-out: no dict built per call)."""
    return _AUDIENCES[stream_key[0]]


def connection_streams(tenant_id: UUID, role: str, device_id: str) -> dict[str, str]:
    """Return the three stream keys of a connection, by their name on the wire."""
    return {
        "tenant": tenant_stream(tenant_id),
        "role": role_stream(tenant_id, role),
        "device": device_stream(tenant_id, device_id),
    }


def group_name(prefix: str, stream_key: str) -> str:
    """Return the Channels group of a stream.

    Group names allow only ``[A-Za-z0-9._-]`` and fewer than 100 characters, and device
    ids may hold other characters, so the key is hashed. The prefix keeps deployments
    that share one Redis apart.
    """
    digest = hashlib.blake2b(stream_key.encode(), digest_size=16).hexdigest()
    return f"bp.{_safe(prefix)}.s.{digest}"


def edge_group(prefix: str, edge_id: str) -> str:
    """Return the group that carries directed commands to one edge."""
    name = f"bp.{_safe(prefix)}.edge.{edge_id}"
    if len(name) < 100:
        return name
    # Too long for a group name: hash rather than cut, so two edges never share a group.
    return f"bp.{_safe(prefix)}.edge.{hashlib.blake2b(edge_id.encode(), digest_size=16).hexdigest()}"


def _safe(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[:30] or "tyrum"


def shard_of(tenant_id: UUID, shards: int) -> int:
    """Return the relay shard of a tenant: a stable hash mod ``shards``."""
    return zlib.crc32(tenant_id.bytes) % shards


def new_epoch() -> str:
    import secrets

    return secrets.token_hex(4)


def new_epochs(n: int) -> list[str]:
    """``n`` new epochs from one read of the system's random source (a handshake batch offers
    one for each of its streams, most of which exist already)."""
    import secrets

    pool = secrets.token_hex(4 * n)
    return [pool[i : i + 8] for i in range(0, 8 * n, 8)]


@dataclass(frozen=True)
class Item:
    """One event as stored: what the frame builder needs."""

    offset: int
    event_id: str
    type: str
    occurred_at: str
    payload_json: str


def event_frame(stream_name: str, epoch: str, item: Item) -> str:
    """Render the ``event`` frame of a stored item (``protocol.event_frame``)."""
    return protocol.event_frame(
        stream_name, epoch, item.offset, item.event_id, item.type, item.occurred_at, item.payload_json
    )


def parse_shards(spec: str | None, total: int) -> list[int]:
    """Parse ``"0-3,7"`` into shard numbers; ``None`` or ``""`` means all shards."""
    if not spec:
        return list(range(total))
    result: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = (int(x) for x in part.split("-", 1))
            if low > high:
                raise ValueError(f"empty shard range {part!r}")
            result.update(range(low, high + 1))
        else:
            result.add(int(part))
    if not result:
        raise ValueError(f"shard spec {spec!r} selects no shard")
    bad = [s for s in result if not 0 <= s < total]
    if bad:
        raise ValueError(f"shards {sorted(bad)} are outside 0..{total - 1}")
    return sorted(result)
