"""The admin's live view: a tenant's events as they arrive, through the JavaScript peer SDK
(``static/backplane/tyrum-client.js``) on the admin's own session.

Who may watch what is explicit and checked twice: the ``backplane.view_live_events``
permission opens the page, and the user's ``OperatorAccess`` rows are the tenants it offers —
the same rows the edge requires of the session's WebSocket (``auth._by_session``) and
re-checks every heartbeat. The permission grants no tenant by itself. Payloads are shown only
with ``backplane.view_payload``; the socket is an operator's and receives them either way.
"""

from __future__ import annotations

from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path

from backplane.models import OperatorAccess, Tenant

PERMISSION = "backplane.view_live_events"


def urls(site: AdminSite) -> list[URLPattern]:
    """The live view's URLs, for ``TenantAdmin.get_urls`` (behind the admin's login)."""
    return [
        path("live/", site.admin_view(lambda r: live_events(site, r, None)), name="backplane_live"),
        path("live/<slug:slug>/", site.admin_view(lambda r, slug: live_events(site, r, slug)), name="backplane_live"),
    ]


def live_events(site: AdminSite, request: HttpRequest, slug: str | None) -> HttpResponse:
    """The tenants the user may watch; with ``slug``, that tenant's live view."""
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    user_id = request.user.pk
    assert user_id is not None  # admin_view lets only a logged-in staff user through
    granted = OperatorAccess.objects.filter(user_id=user_id).values("tenant_id")
    tenants = list(Tenant.objects.filter(id__in=granted, is_active=True).order_by("slug"))
    if slug is None and len(tenants) == 1:
        return redirect("admin:backplane_live", slug=tenants[0].slug)
    context = {**site.each_context(request), "title": "Live events", "tenants": tenants}
    if slug is None:
        return TemplateResponse(request, "admin/backplane/live_index.html", context)
    tenant = next((t for t in tenants if t.slug == slug), None)
    if tenant is None:
        raise Http404("no operator access to this tenant")
    context.update(
        title=f"Live events: {tenant.name}",
        tenant=tenant,
        view_payload=request.user.has_perm("backplane.view_payload"),
    )
    return TemplateResponse(request, "admin/backplane/live.html", context)
