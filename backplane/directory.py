"""The connection directory: the one owner of ``Edge`` and ``Connection`` rows.

An edge registers its row when it starts, adds a row per socket when the socket opens,
removes it when it closes, and refreshes both every heartbeat (``beat``): rows carry an
``expires_at`` the heartbeat pushes ahead, so an edge that dies without a clean close leaves
rows that ``sweep`` removes once their TTL passes (the edges' heartbeats and compaction call
it). Readers: ``presence``, directed-command routing, status pages.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.db import IntegrityError, connection, transaction
from django.db.models import Count
from django.utils import timezone

from backplane.conf import conf
from backplane.models import Connection, Edge, Tenant


class Rows(Protocol):
    """An edge's sockets' rows: counted without building them (``beat``)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...


def start_edge(edge_id: str) -> None:
    """An edge process starts: it holds no socket yet, so rows left under its id by an earlier
    life (killed, restarted with the same ``EDGE_ID``) go, and its row is written afresh."""
    Connection.objects.filter(edge_id=edge_id).delete()
    register_edge(edge_id)


def register_edge(edge_id: str) -> None:
    """Write (or refresh) this edge's row as started now."""
    now = timezone.now()
    Edge.objects.update_or_create(
        edge_id=edge_id, defaults={"host": socket.gethostname(), "heartbeat_at": now, "started_at": now}
    )


def unregister_edge(edge_id: str) -> None:
    """Remove this edge's row and its connections' rows (a clean shutdown or drain)."""
    Connection.objects.filter(edge_id=edge_id).delete()
    Edge.objects.filter(edge_id=edge_id).delete()


def open_connections(edge_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add the rows of sockets opening together, in one statement. If this edge's row was
    swept meanwhile (a heartbeat stalled past the TTL), the edge registers again first."""
    if not rows:
        return
    expires = timezone.now() + timedelta(seconds=conf.CONNECTION_TTL_SECS)

    def insert() -> None:
        if connection.vendor == "postgresql":  # one statement of arrays: no per-row SQL to build
            with connection.cursor() as cur:
                cur.execute(
                    "INSERT INTO backplane_connection (connection_id, tenant_id, device_id, role, token_id, edge_id,"
                    " channel_name, expires_at, positions) SELECT c, t, d, r, k, %s, h, %s, '{}'::jsonb"
                    " FROM unnest(%s::text[], %s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::text[])"
                    " AS v(c, t, d, r, k, h)",
                    [edge_id, expires, *(list(col) for col in zip(*(_columns(row) for row in rows), strict=True))],
                )
            return
        with transaction.atomic():
            Connection.objects.bulk_create([Connection(edge_id=edge_id, expires_at=expires, **row) for row in rows])

    try:
        insert()
    except IntegrityError:
        register_edge(edge_id)
        insert()


def _columns(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        row["connection_id"],
        row["tenant_id"],
        row["device_id"],
        row["role"],
        row["token_id"],
        row["channel_name"],
    )


def over_caps(
    principals: Sequence[tuple[uuid.UUID, uuid.UUID | None]], per_token: int | None, per_tenant: int | None
) -> list[str | None]:
    """For connections opening together, as (tenant id, token id) in order: which cap
    (``"token"``, ``"tenant"``) each would pass, or None. Live rows are counted cluster-wide
    (one statement for them all), and each one let in counts against the ones after it,
    so a batch never lets more than the cap in; racing handshakes on other edges may pass
    a cap by a few. Live: written or refreshed within the last two heartbeats — the rows of
    an edge that died (its peers reconnecting elsewhere) do not count while they wait for
    the sweep."""
    fresh = timezone.now() + timedelta(seconds=conf.CONNECTION_TTL_SECS - 2 * conf.HEARTBEAT_INTERVAL_SECS)
    tokens = {token for _, token in principals if token is not None} if per_token is not None else set()
    tenants = {tenant for tenant, _ in principals} if per_tenant is not None else set()
    if connection.vendor == "postgresql":
        by_token, by_tenant = _live_counts(fresh, tokens, tenants)
    else:
        by_token, by_tenant = _live_counts_orm(fresh, tokens, tenants)
    out: list[str | None] = []
    for tenant, token in principals:
        if per_token is not None and token is not None and by_token.get(token, 0) >= per_token:
            out.append("token")
        elif per_tenant is not None and by_tenant.get(tenant, 0) >= per_tenant:
            out.append("tenant")
        else:
            out.append(None)
            if token is not None:
                by_token[token] = by_token.get(token, 0) + 1
            by_tenant[tenant] = by_tenant.get(tenant, 0) + 1
    return out


def _live_counts(fresh: datetime, tokens: set[Any], tenants: set[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
    """(PostgreSQL) the live rows of ``tokens`` and of ``tenants``, counted in one statement
    with one array parameter each: the ORM's two grouped queries cost ~1.4 ms of Python per
    handshake batch to compile, holding the GIL the event loop needs (docs/decisions/0038)."""
    parts: list[str] = []
    params: list[Any] = []
    if tokens:
        parts.append(
            "SELECT 0, token_id, count(*) FROM backplane_connection"
            " WHERE expires_at > %s AND token_id = ANY(%s::uuid[]) GROUP BY token_id"
        )
        params += [fresh, list(tokens)]
    if tenants:
        parts.append(
            "SELECT 1, tenant_id, count(*) FROM backplane_connection"
            " WHERE expires_at > %s AND tenant_id = ANY(%s::uuid[]) GROUP BY tenant_id"
        )
        params += [fresh, list(tenants)]
    counted: tuple[dict[Any, int], dict[Any, int]] = ({}, {})
    if parts:
        with connection.cursor() as cur:
            cur.execute(" UNION ALL ".join(parts), params)
            for which, key, n in cur.fetchall():
                counted[which][key] = n
    return counted


def _live_counts_orm(fresh: datetime, tokens: set[Any], tenants: set[Any]) -> tuple[dict[Any, int], dict[Any, int]]:
    """``_live_counts`` on other databases, through the ORM."""
    live = Connection.objects.filter(expires_at__gt=fresh)
    by_token: dict[Any, int] = {}
    by_tenant: dict[Any, int] = {}
    if tokens:
        counted = live.filter(token_id__in=tokens).values("token_id").annotate(n=Count("*"))
        by_token = {token: n for token, n in counted.values_list("token_id", "n")}
    if tenants:
        counted = live.filter(tenant_id__in=tenants).values("tenant_id").annotate(n=Count("*"))
        by_tenant = {tenant: n for tenant, n in counted.values_list("tenant_id", "n")}
    return by_token, by_tenant


def close_connection(connection_id: str) -> None:
    """Remove a socket's row (the sweep does it later if this fails)."""
    Connection.objects.filter(connection_id=connection_id).delete()


def beat(edge_id: str, rows: Rows, positions: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Refresh this edge's row and its sockets' rows; repair and sweep.

    ``rows`` are the rows of the sockets the edge holds now. Rows of sockets it no longer
    holds (a failed delete at disconnect) go; rows of live sockets that were swept (a
    heartbeat stall past the TTL) come back. ``positions``: where the peers whose position
    changed since the last beat stand now, by connection id (``write_positions``). ``rows``
    is iterated only when the counts differ (the edge builds its rows lazily)."""
    now = timezone.now()
    ttl = timedelta(seconds=conf.CONNECTION_TTL_SECS)
    if not Edge.objects.filter(edge_id=edge_id).update(heartbeat_at=now):
        register_edge(edge_id)
    refreshed = Connection.objects.filter(edge_id=edge_id).update(expires_at=now + ttl, last_seen_at=now)
    if refreshed != len(rows):
        live = list(rows)
        # Only rows older than a beat go: an opening socket has its row before its edge lists it.
        settled = now - timedelta(seconds=conf.HEARTBEAT_INTERVAL_SECS)
        live_ids = [row["connection_id"] for row in live]
        stale = Connection.objects.filter(edge_id=edge_id, connected_at__lt=settled)
        stale.exclude(connection_id__in=live_ids).delete()
        # Only the missing rows: in a connect storm the counts differ at every beat.
        have = set(Connection.objects.filter(edge_id=edge_id).values_list("connection_id", flat=True))
        Connection.objects.bulk_create(
            [
                Connection(edge_id=edge_id, expires_at=now + ttl, last_seen_at=now, **row)
                for row in live
                if row["connection_id"] not in have
            ],
            ignore_conflicts=True,
        )
    if positions:
        write_positions(positions)
    sweep(now, keep=edge_id, every_row=False)


def write_positions(positions: Mapping[str, Mapping[str, Any]]) -> None:
    """Write each connection's ``positions`` (by connection id) in one statement per beat."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute(
                "UPDATE backplane_connection c SET positions = v.value FROM jsonb_each(%s::jsonb) v "
                "WHERE c.connection_id = v.key",
                [json.dumps(positions)],
            )
        return
    rows = [Connection(connection_id=cid, positions=dict(p)) for cid, p in positions.items()]
    Connection.objects.bulk_update(rows, ["positions"], batch_size=500)


def sweep(now: datetime | None = None, keep: str | None = None, *, every_row: bool = True) -> tuple[int, int]:
    """Remove rows of sockets whose TTL passed and of edges that stopped beating (and with
    them their sockets' rows); return (connections, edges) removed. ``keep``: the calling
    edge, alive whatever its row says.

    ``every_row`` False (the heartbeat's sweep): only the edges that stopped beating, found
    by their own rows. A beating edge refreshes all its rows in the same beat as its own, so
    its rows expire only with it; the rows that expire on an edge still beating (its
    refresh failed while its own row's went through) are invisible to every reader, which
    all filter ``expires_at``, and compaction's sweep removes them: ``expires_at`` has no
    index (the refresh stays a HOT update, docs/decisions/0045-heartbeat-rows-hot.md), so
    looking for them is a scan of the table, too much for every beat of every edge."""
    now = now or timezone.now()
    connections = Connection.objects.filter(expires_at__lt=now).delete()[0] if every_row else 0
    dead = Edge.objects.filter(heartbeat_at__lt=now - timedelta(seconds=conf.CONNECTION_TTL_SECS))
    if keep is not None:
        dead = dead.exclude(edge_id=keep)
    edges = dead.delete()[1].get("backplane.Edge", 0)
    return connections, edges


def presence(tenant: Tenant | uuid.UUID | str) -> list[dict[str, Any]]:
    """Return the devices of a tenant online now: device id, roles and edges."""
    from backplane.outbox import resolve_tenant

    obj = resolve_tenant(tenant)
    rows = (
        Connection.objects.filter(tenant=obj, expires_at__gt=timezone.now())
        .values_list("device_id", "role", "edge_id")
        .order_by("device_id")
    )
    devices: dict[str, dict[str, Any]] = {}
    for device_id, role, edge_id in rows:
        entry = devices.setdefault(
            device_id, {"device_id": device_id, "roles": set(), "edges": set(), "connections": 0}
        )
        entry["roles"].add(role)
        entry["edges"].add(edge_id)
        entry["connections"] += 1
    return [{**d, "roles": sorted(d["roles"]), "edges": sorted(d["edges"])} for d in devices.values()]
