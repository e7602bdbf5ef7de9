"""The admin's cockpit in headless Chromium (backplane/cockpit.py): an operator logs in, opens
'Backplane status' while events flow, drains an edge from it, and sees its peers move to the
other edge. Screenshots go to the test's ``tmp_path/screenshots``."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from harness.data import make_tenant, make_token, orm, publish
from harness.peer import Peer, PeerClosed
from tests.e2e.test_browser_client import browser, screenshot_path, serve_static_without_whitenoise  # noqa: F401
from tests.e2e.test_live_view import PASSWORD, make_staff

pytestmark = pytest.mark.e2e

HEARTBEAT_SECS = 1
PAGE_TIMEOUT_MS = 20_000
STATUS = "/admin/backplane/edge/status/"
SETTLE_SECS = 15


async def connections_shown(page: Any, edge_id: str) -> int:
    """The edge's live connections on the page (0 when its row is gone: a drained edge's)."""
    cell = page.locator(f'tr[data-edge="{edge_id}"] td.bp-connections')
    return int(await cell.inner_text()) if await cell.count() else 0


def position(peer: Peer, name: str) -> int:
    """The last offset the peer got on stream ``name``."""
    got = peer.stream_events(name)
    return int(got[-1]["offset"]) if got else peer.head(name)[1]


async def until_shown(page: Any, origin: str, wanted: dict[str, int]) -> None:
    deadline = asyncio.get_running_loop().time() + SETTLE_SECS
    while True:
        await page.goto(origin + STATUS)
        shown = {edge: await connections_shown(page, edge) for edge in wanted}
        if shown == wanted:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the status page shows {shown}, not {wanted}")
        await asyncio.sleep(0.5)


async def test_cockpit__drain_an_edge_from_the_status_page_and_see_its_peers_move(
    own_cluster, browser: Any, tmp_path: Path  # noqa: F811
) -> None:
    own_cluster.start_edges(["e2e-cockpit-a", "e2e-cockpit-b"], BACKPLANE_HEARTBEAT_INTERVAL_SECS=str(HEARTBEAT_SECS))
    own_cluster.start_relay("e2e-cockpit-relay")
    a, b = own_cluster.urls
    tenant = await orm(make_tenant)
    tokens = [await orm(make_token, tenant, f"dev-{i}") for i in range(4)]
    on_a = [await Peer.open(a, token) for token in tokens[:3]]
    on_b = [await Peer.open(b, tokens[3])]
    user = await orm(make_staff, [], "view_edge", "change_edge")

    async def traffic() -> None:
        n = 0
        while True:
            await orm(publish, tenant, "cockpit.tick", {"n": n})
            n += 1
            await asyncio.sleep(0.2)

    flowing = asyncio.create_task(traffic())
    origin = f"http://127.0.0.1:{own_cluster.ports[1]}"  # the admin from the edge that stays
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    await serve_static_without_whitenoise(page)
    try:
        await page.goto(f"{origin}/admin/login/?next={STATUS}")
        await page.fill("#id_username", user.username)
        await page.fill("#id_password", PASSWORD)
        await page.click("input[type=submit]")
        await page.wait_for_url(origin + STATUS)
        await until_shown(page, origin, {"e2e-cockpit-a": 3, "e2e-cockpit-b": 1})
        await on_a[0].until_events(1, timeout=10)  # events are flowing
        assert await page.locator("#bp-leases").inner_text()
        await page.screenshot(path=str(screenshot_path(tmp_path, "cockpit-status.png")), full_page=True)

        await page.click('tr[data-edge="e2e-cockpit-a"] a.bp-drain')
        assert "Drain edge e2e-cockpit-a?" in await page.locator(".bp-question").inner_text()
        await page.screenshot(path=str(screenshot_path(tmp_path, "cockpit-drain-confirm.png")), full_page=True)
        await page.click("input[type=submit]")
        await page.wait_for_url(origin + STATUS)
        assert "is draining" in await page.locator(".messagelist").inner_text()

        for i, peer in enumerate(on_a):  # the peers move, as a client does on 4001: to another edge, resuming
            assert await peer.closed(timeout=15) == 4001
            moved = await Peer.open(b, tokens[i])
            on_b.append(moved)
            resume = {name: {"epoch": s["epoch"], "offset": position(peer, name)}
                      for name, s in peer.hello["streams"].items()}
            await moved.send({"type": "resume", "streams": resume})
            await moved.until_resumed()
        await until_shown(page, origin, {"e2e-cockpit-a": 0, "e2e-cockpit-b": 4})
        await on_b[-1].until(lambda p: len(p.events) >= 1, timeout=10, what="events after the move")
        shot = screenshot_path(tmp_path, "cockpit-after-drain.png")
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 1000
    finally:
        flowing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flowing
        for peer in [*on_a, *on_b]:
            with contextlib.suppress(PeerClosed, Exception):
                await peer.close()
