"""The admin's live view (``backplane/live.py``): who may open it, the edge's same-origin rule
for its session socket, and the page itself in headless Chromium in the cluster and the
embedded mode — logged in through the admin's form, watching an event published from the
shell arrive. Screenshots go to each test's ``tmp_path/screenshots``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from harness import procs, waits
from harness.cluster import Cluster
from harness.data import make_tenant, orm
from harness.env import child_env
from harness.peer import Peer, refused_status
from harness.procs import Proc
from tests.e2e.test_browser_client import browser, screenshot_path, serve_static_without_whitenoise  # noqa: F401

pytestmark = pytest.mark.e2e

PASSWORD = "live-view-pass-1"  # noqa: S105  (a test user's)
PAGE_TIMEOUT_MS = 20_000


def make_staff(tenants: list[Any], *perms: str) -> Any:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from backplane.models import OperatorAccess

    user = get_user_model().objects.create_user(f"staff-{uuid.uuid4().hex[:8]}", password=PASSWORD, is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="backplane", codename__in=perms))
    for tenant in tenants:
        OperatorAccess.objects.create(user=user, tenant=tenant)
    return user


def admin_client(user: Any) -> Any:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def live_path(slug: str | None = None) -> str:
    return "/admin/backplane/tenant/live/" + (f"{slug}/" if slug else "")


# --- who may open it ----------------------------------------------------------------------


@pytest.mark.usefixtures("e2e_db")
def test_live_view__needs_the_permission() -> None:
    tenant = make_tenant()
    client = admin_client(make_staff([tenant]))
    assert client.get(live_path()).status_code == 403
    assert client.get(live_path(tenant.slug)).status_code == 403


@pytest.mark.usefixtures("e2e_db")
def test_live_view__offers_only_tenants_with_operator_access() -> None:
    mine, other = make_tenant(), make_tenant()
    client = admin_client(make_staff([mine], "view_live_events"))

    response = client.get(live_path())
    assert response.status_code == 302 and response["Location"] == live_path(mine.slug)
    assert client.get(live_path(other.slug)).status_code == 404
    page = client.get(live_path(mine.slug))
    assert page.status_code == 200
    assert f'data-tenant="{mine.slug}"' in page.content.decode()

    nowhere = admin_client(make_staff([], "view_live_events")).get(live_path())
    assert nowhere.status_code == 200 and b"no operator access" in nowhere.content


@pytest.mark.usefixtures("e2e_db")
def test_live_view__payload_column_only_with_view_payload() -> None:
    tenant = make_tenant()
    without = admin_client(make_staff([tenant], "view_live_events")).get(live_path(tenant.slug)).content.decode()
    with_it = admin_client(make_staff([tenant], "view_live_events", "view_payload")).get(live_path(tenant.slug))
    assert 'data-view-payload="0"' in without and "<th>Payload</th>" not in without
    assert 'data-view-payload="1"' in with_it.content.decode() and "<th>Payload</th>" in with_it.content.decode()


# --- the edge's own origin ------------------------------------------------------------------


async def test_live_view__session_socket_from_the_edges_own_origin_only(cluster: Cluster) -> None:
    # No BACKPLANE_ALLOWED_ORIGINS in this cluster: only the edge's own origin may use a session.
    tenant = await orm(make_tenant)
    user = await orm(make_staff, [tenant], "view_live_events")
    session = (await orm(admin_client, user)).cookies[settings.SESSION_COOKIE_NAME].value
    port = cluster.ports[0]
    url = f"ws://127.0.0.1:{port}/ws?tenant={tenant.slug}"

    def headers(origin: str) -> dict[str, str]:
        return {"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}", "Origin": origin}

    peer = await Peer.open(url, headers=headers(f"http://127.0.0.1:{port}"))
    try:
        assert peer.hello["protocol"] == "tyrum-v1"
    finally:
        await peer.close()
    for foreign in ["http://evil.example", f"http://127.0.0.1:{cluster.ports[1]}", f"https://127.0.0.1:{port}", "null"]:
        assert await refused_status(url, headers=headers(foreign)) == 403, foreign


# --- the page in Chromium -------------------------------------------------------------------


async def log_in_and_open(browser: Any, origin: str, username: str, slug: str) -> Any:  # noqa: F811
    page = await browser.new_page(viewport={"width": 1200, "height": 700})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    await serve_static_without_whitenoise(page)
    await page.goto(f"{origin}/admin/login/?next={live_path(slug)}")
    await page.fill("#id_username", username)
    await page.fill("#id_password", PASSWORD)
    await page.click("input[type=submit]")
    await page.wait_for_url(f"{origin}{live_path(slug)}")
    await page.wait_for_selector('.tyrum-live-status[data-status="live"]')
    return page


async def publish_from_shell(env: dict[str, str], slug: str, type: str, payload: dict[str, Any]) -> str:
    out = await asyncio.to_thread(
        procs.manage, "publish_event", "--tenant", slug, "--type", type, "--payload", json.dumps(payload), env=env
    )
    return out.strip().splitlines()[-1]


async def see_row(page: Any, type: str) -> list[str]:
    row = page.locator(f'tbody tr[data-type="{type}"]')
    await row.first.wait_for()
    return [text.strip() for text in await row.first.locator("td").all_inner_texts()]


async def test_live_view__cluster_shows_events_live_with_pause(
    cluster: Cluster,
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    tenant = await orm(make_tenant)
    user = await orm(make_staff, [tenant], "view_live_events", "view_payload")
    origin = f"http://127.0.0.1:{cluster.ports[0]}"
    page = await log_in_and_open(browser, origin, user.username, tenant.slug)

    await publish_from_shell(cluster.env, tenant.slug, "live.demo", {"device_id": "dev-7", "n": 1})
    cells = await see_row(page, "live.demo")
    assert cells[1:4] == ["tenant", "1", "live.demo"]
    assert json.loads(cells[4]) == {"device_id": "dev-7", "n": 1}

    await page.click("[data-action=pause]")
    await publish_from_shell(cluster.env, tenant.slug, "live.paused", {"device_id": "dev-8"})
    await page.wait_for_selector(".tyrum-live-held:not([hidden])")
    assert await page.locator('tbody tr[data-type="live.paused"]').count() == 0
    await page.click("[data-action=pause]")
    await see_row(page, "live.paused")
    await page.fill("input[name=device]", "dev-7")
    assert await page.locator("tbody tr").count() == 1
    await page.fill("input[name=device]", "")
    await page.fill("input[name=type]", "live.paused")
    assert await page.locator("tbody tr").count() == 1
    await page.fill("input[name=type]", "")

    shot = screenshot_path(tmp_path, "live-view-cluster.png")
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000


EMBEDDED_SETUP = """
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from backplane.models import OperatorAccess, Tenant
tenant = Tenant.objects.create(slug="live-co", name="Live Co")
user = get_user_model().objects.create_user("watcher", password="{password}", is_staff=True)
user.user_permissions.add(Permission.objects.get(codename="view_live_events"))
OperatorAccess.objects.create(user=user, tenant=tenant)
"""


async def test_live_view__embedded_serve_shows_events_live(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path / 'embedded.sqlite3'}", REDIS_URL="")
    procs.manage("migrate", "--no-input", "-v", "0", env=env)
    procs.manage("shell", "-c", EMBEDDED_SETUP.format(password=PASSWORD), env=env)
    port = waits.free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    serve = Proc("serve", [procs.PYTHON, "manage.py", "serve", "--port", str(port)], env, log_dir)
    try:
        waits.wait_port(port, timeout=30)
        page = await log_in_and_open(browser, f"http://127.0.0.1:{port}", "watcher", "live-co")
        await publish_from_shell(env, "live-co", "live.embedded", {"secret": "not shown"})
        cells = await see_row(page, "live.embedded")
        assert cells[1:] == ["tenant", "1", "live.embedded"], "no payload column without view_payload"
        assert "not shown" not in await page.content()
        shot = screenshot_path(tmp_path, "live-view-embedded.png")
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 1000
    finally:
        serve.stop()
