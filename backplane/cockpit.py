"""The admin's cockpit: the 'Backplane status' page and the operator's directed commands.

The page shows the backlog per shard, the oldest pending event, relays and their leases, edges
with their live connections and last beat, the last minute's publish and forward counts, and
the outbox's oldest row (compaction keeps it inside the retention window). Every read is
bounded on a large outbox (``status.py``).

Actions — drain an edge, disconnect a device, resync a tenant's or a device's streams — are
directed commands (``commands.py``): each asks for a confirmation on a page of its own, is sent
only on a POST, and leaves an entry in the admin's history (``LogEntry``) naming who did it.
Revoking tokens is the token list's action (``AccessTokenAdmin.revoke_selected``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.contrib.admin import AdminSite, ModelAdmin
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from backplane import commands, status
from backplane.conf import conf
from backplane.models import Edge, Tenant
from backplane.store import OUTBOX

VIEW_PERMISSION = "backplane.view_edge"
DRAIN_PERMISSION = "backplane.change_edge"
DISCONNECT_PERMISSION = "backplane.change_connection"
# The "recent rates" window: rows created this long ago or less (the BRIN index on created_at).
RATE_WINDOW_SECS = 60


def urls(site: AdminSite) -> list[URLPattern]:
    """The cockpit's URLs, for ``EdgeAdmin.get_urls`` (behind the admin's login)."""
    return [
        path("status/", site.admin_view(lambda r: status_page(site, r)), name="backplane_status"),
        path(
            "status/drain/<str:edge_id>/",
            site.admin_view(lambda r, edge_id: drain(site, r, edge_id)),
            name="backplane_drain",
        ),
        path(
            "status/disconnect/",
            site.admin_view(lambda r: device_command(site, r, "disconnect")),
            name="backplane_disconnect",
        ),
        path("status/resync/", site.admin_view(lambda r: device_command(site, r, "resync")), name="backplane_resync"),
    ]


def _require(request: HttpRequest, permission: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied


def status_page(site: AdminSite, request: HttpRequest) -> HttpResponse:
    _require(request, VIEW_PERMISSION)
    now = timezone.now()
    snap = status.snapshot()
    context = {
        **site.each_context(request),
        "title": "Backplane status",
        "snap": snap,
        "leases": status.collapse_leases(snap["leases"]),
        "backlog_by_shard": backlog_by_shard(),
        "edges": [
            {"edge_id": e.edge_id, "host": e.host, "n": e.n, "beat_age": (now - e.heartbeat_at).total_seconds()}
            for e in Edge.objects.annotate(n=Count("connections", filter=Q(connections__expires_at__gt=now))).order_by(
                "edge_id"
            )
        ],
        "recent": recent_rates(),
        "oldest_row_age_secs": oldest_row_age(),
        "retention_secs": conf.RETENTION_SECS,
        "can_drain": request.user.has_perm(DRAIN_PERMISSION),
        "can_disconnect": request.user.has_perm(DISCONNECT_PERMISSION),
        "now": now,
    }
    return TemplateResponse(request, "admin/backplane/status.html", context)


def backlog_by_shard() -> list[tuple[int, int, int]]:
    """(shard, unassigned, unforwarded) for shards with rows waiting (capped counts)."""
    cap = status.BACKLOG_COUNT_CAP
    rows: dict[int, list[int]] = {}
    with connection.cursor() as cur:
        for i, where in enumerate(("stream_offset IS NULL", "stream_offset IS NOT NULL AND forwarded_at IS NULL")):
            cur.execute(
                f"SELECT shard, count(*) FROM (SELECT shard FROM {OUTBOX} WHERE {where} LIMIT %s) t GROUP BY shard",
                [cap],
            )
            for shard, n in cur.fetchall():
                rows.setdefault(int(shard), [0, 0])[i] = int(n)
    return [(shard, a, b) for shard, (a, b) in sorted(rows.items())]


def recent_rates() -> dict[str, float]:
    """Events published in the last minute, and how many of them are forwarded, per second."""
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*), count(forwarded_at) FROM {OUTBOX} WHERE created_at > %s",
            [timezone.now() - timedelta(seconds=RATE_WINDOW_SECS)],
        )
        published, forwarded = cur.fetchone()
    return {"published": published / RATE_WINDOW_SECS, "forwarded": forwarded / RATE_WINDOW_SECS}


def oldest_row_age() -> float | None:
    """Age of the outbox's oldest row (found through the id order, not a scan)."""
    with connection.cursor() as cur:
        cur.execute(f"SELECT created_at FROM {OUTBOX} ORDER BY id LIMIT 1")
        row = cur.fetchone()
    if row is None:
        return None
    return (timezone.now() - status._aware(row[0])).total_seconds()


def _audit(site: AdminSite, request: HttpRequest, obj: Any, message: str) -> None:
    model_admin: ModelAdmin[Any] = site._registry[type(obj)]
    model_admin.log_change(request, obj, message)


def drain(site: AdminSite, request: HttpRequest, edge_id: str) -> HttpResponse:
    """Confirm, then tell the edge to close every socket with 4001 and refuse new ones."""
    _require(request, DRAIN_PERMISSION)
    edge = Edge.objects.filter(edge_id=edge_id).first()
    if edge is None:
        raise Http404("no such edge")
    if request.method == "POST" and request.POST.get("post") == "yes":
        commands.drain_edge(edge.edge_id)
        _audit(site, request, edge, "Drained from the status page: its sockets close with 4001 and resume elsewhere")
        messages.success(request, f"Edge {edge.edge_id} is draining: its peers reconnect to the other edges.")
        return redirect("admin:backplane_status")
    connections = edge.connections.filter(expires_at__gt=timezone.now()).count()
    context = {
        **site.each_context(request),
        "title": f"Drain edge {edge.edge_id}",
        "question": f"Drain edge {edge.edge_id}? Its {connections} connection(s) close with 4001 and resume on "
        "the other edges; it refuses new ones until it restarts.",
        "fields": {},
        "confirm": "Yes, drain it",
    }
    return TemplateResponse(request, "admin/backplane/confirm_command.html", context)


def device_command(site: AdminSite, request: HttpRequest, command: str) -> HttpResponse:
    """Confirm, then disconnect a device (4008) or resync a tenant's or a device's streams (4409)."""
    _require(request, DISCONNECT_PERMISSION)
    data = request.POST if request.method == "POST" else request.GET
    tenant = Tenant.objects.filter(slug=data.get("tenant", "")).first()
    device = data.get("device", "").strip()
    if tenant is None or (command == "disconnect" and not device):
        raise Http404("name a tenant (and, to disconnect, a device)")
    target = f"{tenant.slug}/{device}" if device else f"every device of {tenant.slug}"
    if request.method == "POST" and request.POST.get("post") == "yes":
        if command == "disconnect":
            edges = commands.disconnect_device(tenant, device)
            text = f"Disconnected device {device} (4008) from the status page"
        else:
            edges = commands.resync(tenant, device or None)
            text = f"Resynced {target} (4409) from the status page"
        _audit(site, request, tenant, text)
        messages.success(request, f"{text}: sent to {len(edges)} edge(s).")
        return redirect("admin:backplane_status")
    question = (
        f"Disconnect device {target}? Its sockets close with 4008; it may connect again."
        if command == "disconnect"
        else f"Resync {target}? Their sockets close with 4409 and the peers refetch their state."
    )
    context = {
        **site.each_context(request),
        "title": f"{command.capitalize()} {target}",
        "question": question,
        "fields": {"tenant": tenant.slug, "device": device},
        "confirm": f"Yes, {command}",
    }
    return TemplateResponse(request, "admin/backplane/confirm_command.html", context)
