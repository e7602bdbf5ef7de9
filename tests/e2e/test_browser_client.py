"""The JavaScript peer SDK in a real browser: Debian's chromium, headless, driven by
Playwright (``executable_path``; Playwright's own browser download is not used).

A test page on the edge's origin imports the module the edge serves as a Django static file
(``/static/backplane/tyrum-client.js``), connects with a token (the ``tyrum-auth.``
subprotocol, as browsers must), receives events published from Python, and survives an edge
restart with nothing lost or repeated. A screenshot goes to the test's ``tmp_path``.

Static files: the edges serve them through WhiteNoise (issue 14). Where WhiteNoise is not
installed, the browser's requests for ``/static/`` are answered by this test process from
Django's static finders — what WhiteNoise does with ``WHITENOISE_USE_FINDERS`` — and only then.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import mimetypes
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import Cluster
from harness.data import events, make_tenant, make_token, orm, publish_many, stream_key, wait_assigned

pytestmark = pytest.mark.e2e

# Bound on waits in the page (milliseconds).
PAGE_TIMEOUT_MS = 20_000
SCREENSHOTS = "screenshots"

TEST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tyrum-client in Chromium</title>
<style>body{font:14px sans-serif;margin:2em} td{padding:2px 8px;font-family:monospace}
#status{font-weight:bold}</style></head>
<body><h1>tyrum-client in Chromium</h1><p>status: <span id="status">idle</span></p>
<table><thead><tr><th>stream</th><th>offset</th><th>type</th><th>replayed</th><th>event id</th></tr></thead>
<tbody id="rows"></tbody></table>
<script type="module">
import { TyrumClient, Resync } from "/static/backplane/tyrum-client.js";
window.items = [];
window.statuses = [];
window.start = (token) => {
  const url = new URL("/ws", location.href);
  url.protocol = "ws:";
  const client = new TyrumClient(url.href, {
    token,
    backoffInitial: 0.2,
    backoffMax: 1,
    onStatus: (s) => { window.statuses.push(s); document.getElementById("status").textContent = s; },
  });
  window.client = client;
  (async () => {
    try {
      for await (const item of client.events()) {
        window.items.push(item instanceof Resync ? { resync: item.reason } : item);
        const tr = document.createElement("tr");
        for (const v of [item.stream, item.offset, item.type, item.replayed, item.eventId]) {
          const td = document.createElement("td"); td.textContent = String(v); tr.append(td);
        }
        document.getElementById("rows").append(tr);
      }
    } catch (error) {
      window.failure = error.name;
    }
  })();
};
window.ready = true;
</script></body></html>
"""


def chromium() -> str:
    path = shutil.which("chromium")
    assert path is not None, "chromium is required (apt-get install -y chromium; .ci/run does it)"
    return path


def static_file(path: str) -> Path | None:
    """``path`` under STATIC_URL, found as WhiteNoise's finders mode finds it."""
    from django.contrib.staticfiles import finders

    found = finders.find(path)
    return Path(found) if isinstance(found, str) else None


async def serve_static_without_whitenoise(page: Any) -> None:
    """Answer the page's ``/static/`` requests from the finders if the edge cannot (no WhiteNoise)."""
    if importlib.util.find_spec("whitenoise") is not None:
        return

    async def fulfill(route: Any) -> None:
        path = route.request.url.split("/static/", 1)[1].split("?", 1)[0]
        found = static_file(path)
        if found is None:
            await route.fulfill(status=404, body="")
            return
        kind = "text/javascript" if found.suffix == ".js" else mimetypes.guess_type(found.name)[0] or "text/plain"
        await route.fulfill(status=200, body=found.read_bytes(), content_type=kind)

    await page.route("**/static/**", fulfill)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=chromium(), headless=True)
        try:
            yield instance
        finally:
            await instance.close()


async def open_page(browser: Any, origin: str, html: str) -> Any:
    """A page on the edge's origin (loaded from the edge, ``/healthz``, then given ``html``), so
    its static files and ``/ws`` are same-origin to it and Chromium sees a loopback page."""
    page = await browser.new_page(viewport={"width": 1100, "height": 700})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    await serve_static_without_whitenoise(page)
    await page.goto(origin + "/healthz")
    await page.set_content(html)
    return page


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / SCREENSHOTS
    folder.mkdir(exist_ok=True)
    return folder / name


async def items(page: Any) -> list[dict[str, Any]]:
    return list(json.loads(await page.evaluate("JSON.stringify(window.items)")))


async def wait_items(page: Any, n: int) -> list[dict[str, Any]]:
    await page.wait_for_function(f"window.items.length >= {n} || window.failure")
    assert await page.evaluate("window.failure || null") is None
    return await items(page)


async def wait_live(page: Any, times: int) -> None:
    try:
        await page.wait_for_function(f"window.statuses.filter((s) => s === 'live').length >= {times} || window.failure")
    except Exception:
        statuses = await page.evaluate("JSON.stringify(window.statuses)")
        raise AssertionError(f"the page did not go live #{times}: statuses {statuses}") from None
    assert await page.evaluate("window.failure || null") is None


async def test_browser_client__token_page_survives_an_edge_restart(
    cluster: Cluster, browser: Any, tmp_path: Path
) -> None:
    tenant = await orm(make_tenant)
    token = await orm(make_token, tenant, "browser-1")
    key = await orm(stream_key, tenant, "device", device="browser-1")
    origin = f"http://127.0.0.1:{cluster.ports[0]}"
    page = await open_page(browser, origin, TEST_PAGE)
    await page.wait_for_function("window.ready === true")
    await page.evaluate("(token) => window.start(token)", token)  # never in a URL or the document
    await wait_live(page, 1)
    assert await page.evaluate("window.client.state().device.offset") == 0

    before = await orm(publish_many, tenant, events(4, "browser.before", device="browser-1"))
    await wait_items(page, 4)
    cluster.kill_edge(0)
    during = await orm(publish_many, tenant, events(5, "browser.during", device="browser-1"))
    await wait_assigned(key, 9)
    await asyncio.to_thread(cluster.restart_edge, 0)
    await wait_live(page, 2)
    after = await orm(publish_many, tenant, events(3, "browser.after", device="browser-1"))
    got = await wait_items(page, 12)
    await asyncio.sleep(0.5)  # nothing more arrives: no repeats
    got = await items(page)

    published = before + during + after
    assert [(e["eventId"], e["offset"]) for e in got] == [(eid, i + 1) for i, eid in enumerate(published)]
    assert [e["replayed"] for e in got] == [False] * 4 + [True] * 5 + [False] * 3
    assert token not in await page.content()
    shot = screenshot_path(tmp_path, "browser-client.png")
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
