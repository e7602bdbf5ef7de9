"""Operators browse tenants, tokens, the outbox, streams, edges and connections here.

Payloads are shown, and can be filtered on, only by users with the ``backplane.view_payload``
permission. What the backplane writes itself (outbox, streams, edges, connections, leases,
the token audit) is read-only here; a token's tenant, device, role, hash, expiry and
revocation are fixed once it exists, and revoking (an action, audited) is never undone.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html

from backplane import cockpit, live, tokens
from backplane.models import (
    AccessToken,
    Connection,
    Edge,
    OperatorAccess,
    OutboxItem,
    RelayLease,
    Stream,
    Tenant,
    TokenAudit,
)

# The admin index shows the cockpit (the status page, the live view) above the models.
admin.site.index_template = "admin/backplane/index.html"

# An outbox list counts at most this many rows; past it, pages say "more than".
OUTBOX_COUNT_CAP = 10_000


def _second(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


class CappedCountPaginator(Paginator):
    """Count a page's queryset up to ``OUTBOX_COUNT_CAP`` rows only: a full ``count(*)`` of
    the outbox on every page is a scan of every partition."""

    @cached_property
    def count(self) -> int:
        rows: Any = self.object_list  # a QuerySet: the admin's changelist
        return int(rows.order_by().values("pk")[: OUTBOX_COUNT_CAP + 1].count())


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the backplane keeps itself: an edit or a delete here would corrupt its state
    (a stream's offsets, a lease) or lose what it owes (an unforwarded event, a revocation)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "is_active", "created_at")
    search_fields = ("slug", "name")

    def get_urls(self) -> list[Any]:
        return live.urls(self.admin_site) + super().get_urls()  # the live view: admin/backplane/tenant/live/


@admin.register(AccessToken)
class AccessTokenAdmin(admin.ModelAdmin):
    list_display = ("id", "tenant", "device_id", "role", "label", "created_at", "expires_at", "revoked_at")
    list_filter = ("role", "tenant")
    search_fields = ("device_id", "label")
    # Only the label is editable; the hash is not shown at all.
    fields = ("id", "tenant", "device_id", "role", "label", "created_at", "expires_at", "revoked_at")
    readonly_fields = ("id", "tenant", "device_id", "role", "created_at", "expires_at", "revoked_at")
    actions = ["revoke_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tokens are shown once: create them with manage.py create_token

    def has_delete_permission(self, request: HttpRequest, obj: AccessToken | None = None) -> bool:
        return False  # a deleted token's sockets would stay open: revoke it instead

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        return lookup.split(LOOKUP_SEP)[0] != "token_hash" and super().lookup_allowed(lookup, value, request)

    @admin.action(description="Revoke selected tokens (never undone)", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[AccessToken]) -> TemplateResponse | None:
        """Ask for a confirmation, then revoke each token (``tokens.revoke_token``: audited, and
        its live sockets closed with 4008 on whichever edge holds them)."""
        if request.POST.get("post") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "title": "Revoke tokens",
                "opts": self.model._meta,
                "queryset": queryset,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/backplane/accesstoken/revoke_selected_confirmation.html", context)
        revoked = 0
        for row in queryset:
            if row.revoked_at is None:
                tokens.revoke_token(row, actor=request.user.get_username())
                revoked += 1
        self.message_user(request, f"Revoked {revoked} token(s); their sockets are being closed.", messages.SUCCESS)
        return None


@admin.register(TokenAudit)
class TokenAuditAdmin(ReadOnlyAdmin):
    list_display = ("at", "action", "token_id", "tenant_id", "device_id", "actor", "note")
    list_filter = ("action",)
    search_fields = ("=token_id", "device_id", "actor")


class PendingFilter(admin.SimpleListFilter):
    """Rows by relay state, each through its partial index (no scan of forwarded rows)."""

    title = "state"
    parameter_name = "pending"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("waiting", "waiting (not forwarded)"),
            ("unassigned", "unassigned"),
            ("unforwarded", "assigned, not forwarded"),
            ("forwarded", "forwarded"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "waiting":
            return queryset.filter(forwarded_at__isnull=True)
        if value == "unassigned":
            return queryset.filter(stream_offset__isnull=True)
        if value == "unforwarded":
            return queryset.filter(stream_offset__isnull=False, forwarded_at__isnull=True)
        if value == "forwarded":
            return queryset.filter(forwarded_at__isnull=False)
        return queryset


class TypeFilter(admin.SimpleListFilter):
    """Event types offered from the newest rows only (a distinct over the outbox is a scan)."""

    title = "type"
    parameter_name = "type"
    SAMPLE_ROWS = 2000

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        newest: set[str] = set(OutboxItem.objects.order_by("-id").values_list("type", flat=True)[: self.SAMPLE_ROWS])
        value = self.value()
        if value:
            newest.add(value)
        return [(t, t) for t in sorted(newest)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(type=self.value()) if self.value() else queryset


@admin.register(OutboxItem)
class OutboxItemAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "tenant",
        "kind",
        "type",
        "event_id",
        "stream_link",
        "stream_offset",
        "created",
        "forwarded",
        "payload_bytes",
        "undeliverable_reason",
    )
    list_filter = (PendingFilter, TypeFilter, "kind", "tenant")
    search_fields = ("event_id", "type")  # never the payload
    show_full_result_count = False
    paginator = CappedCountPaginator

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: OutboxItem) -> str:
        return _second(obj.created_at)

    @admin.display(description="forwarded", ordering="forwarded_at")
    def forwarded(self, obj: OutboxItem) -> str:
        return _second(obj.forwarded_at)

    @admin.display(description="stream", ordering="stream")
    def stream_link(self, obj: OutboxItem) -> str:
        url = reverse("admin:backplane_outboxitem_changelist") + "?" + urlencode({"stream": obj.stream})
        return format_html('<a href="{}">{}</a>', url, obj.stream)

    def get_fields(self, request: HttpRequest, obj: OutboxItem | None = None) -> tuple[str, ...]:
        fields = [f.name for f in OutboxItem._meta.fields]
        if not request.user.has_perm("backplane.view_payload"):
            fields.remove("payload")
        return tuple(fields)

    def get_readonly_fields(self, request: HttpRequest, obj: OutboxItem | None = None) -> tuple[str, ...]:
        return self.get_fields(request, obj)

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        # The admin allows any lookup on a local field, JSON key paths included: without the
        # permission, ?payload__pin__startswith=… would read payloads one prefix at a time.
        if lookup.split(LOOKUP_SEP)[0] == "payload" and not (
            request is not None and request.user.has_perm("backplane.view_payload")
        ):
            return False
        return super().lookup_allowed(lookup, value, request)


@admin.register(Stream)
class StreamAdmin(ReadOnlyAdmin):
    list_display = ("key", "tenant", "audience", "epoch", "last_offset", "first_retained_offset", "updated_at", "items")
    list_filter = ("audience",)

    @admin.display(description="items")
    def items(self, obj: Stream) -> str:
        url = reverse("admin:backplane_outboxitem_changelist") + "?" + urlencode({"stream": obj.key})
        return format_html('<a href="{}">items</a>', url)


@admin.register(Edge)
class EdgeAdmin(ReadOnlyAdmin):
    list_display = ("edge_id", "host", "started_at", "heartbeat_at", "connections_link")

    def get_urls(self) -> list[Any]:
        return cockpit.urls(self.admin_site) + super().get_urls()  # the cockpit: admin/backplane/edge/status/

    @admin.display(description="connections")
    def connections_link(self, obj: Edge) -> str:
        url = reverse("admin:backplane_connection_changelist") + "?" + urlencode({"edge__edge_id__exact": obj.edge_id})
        return format_html('<a href="{}">connections</a>', url)


@admin.register(Connection)
class ConnectionAdmin(ReadOnlyAdmin):
    list_display = ("connection_id", "tenant", "device_id", "role", "edge", "where", "connected_at", "expires_at")
    list_filter = ("role", "edge")

    @admin.display(description="delivered / lag (at the last heartbeat)")
    def where(self, obj: Connection) -> str:
        """Where the peer stands per stream: the last offset delivered and how far behind."""
        positions = obj.positions or {}
        return ", ".join(f"{name} {p[0]} / {p[1]}" for name, p in sorted(positions.items())) or "–"


@admin.register(RelayLease)
class RelayLeaseAdmin(ReadOnlyAdmin):
    list_display = ("shard", "holder", "acquired_at", "heartbeat_at", "forwarded_total", "last_forwarded_at")


admin.site.register(OperatorAccess)
