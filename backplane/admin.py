"""Operators browse tenants, tokens, the outbox, streams, edges and connections here.

Payloads are shown only to users with the ``backplane.view_payload`` permission.
"""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from backplane.models import AccessToken, Connection, Edge, OperatorAccess, OutboxItem, RelayLease, Stream, Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "is_active", "created_at")
    search_fields = ("slug", "name")


@admin.register(AccessToken)
class AccessTokenAdmin(admin.ModelAdmin):
    list_display = ("id", "tenant", "device_id", "role", "label", "created_at", "expires_at", "revoked_at")
    list_filter = ("role", "tenant")
    search_fields = ("device_id", "label")
    readonly_fields = ("token_hash",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tokens are shown once: create them with manage.py create_token


@admin.register(OutboxItem)
class OutboxItemAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "tenant",
        "kind",
        "type",
        "event_id",
        "stream",
        "stream_offset",
        "created_at",
        "forwarded_at",
        "payload_bytes",
        "undeliverable_reason",
    )
    list_filter = ("kind", "tenant")
    search_fields = ("event_id", "type")
    show_full_result_count = False

    def get_fields(self, request: HttpRequest, obj: OutboxItem | None = None) -> tuple[str, ...]:
        fields = [f.name for f in OutboxItem._meta.fields]
        if not request.user.has_perm("backplane.view_payload"):
            fields.remove("payload")
        return tuple(fields)

    def get_readonly_fields(self, request: HttpRequest, obj: OutboxItem | None = None) -> tuple[str, ...]:
        return self.get_fields(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: OutboxItem | None = None) -> bool:
        return False


@admin.register(Stream)
class StreamAdmin(admin.ModelAdmin):
    list_display = ("key", "tenant", "audience", "epoch", "last_offset", "first_retained_offset", "updated_at")
    list_filter = ("audience",)


@admin.register(Edge)
class EdgeAdmin(admin.ModelAdmin):
    list_display = ("edge_id", "host", "started_at", "heartbeat_at")


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    list_display = ("connection_id", "tenant", "device_id", "role", "edge", "connected_at", "expires_at")
    list_filter = ("role", "edge")


@admin.register(RelayLease)
class RelayLeaseAdmin(admin.ModelAdmin):
    list_display = ("shard", "holder", "acquired_at", "heartbeat_at", "forwarded_total", "last_forwarded_at")


admin.site.register(OperatorAccess)
