"""The JavaScript peer SDK (clients/js): its Node test suite, run here so `make test` and CI
count it, and the copy the edges serve as a static file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "js"


def test_js_client__node_test_suite_passes() -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (the JavaScript client's tests)"
    files = sorted(str(p.relative_to(CLIENT)) for p in (CLIENT / "test").glob("*.test.js"))
    assert files, "no JavaScript tests found"
    result = subprocess.run(
        [node, "--test", *files],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NODE_OPTIONS": ""},
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout


def test_js_client__static_copy_is_the_package_entry() -> None:
    # The edges serve backplane/static/backplane/tyrum-client.js (Django static files); it must be
    # the module clients/js publishes, byte for byte.
    served = ROOT / "backplane" / "static" / "backplane" / "tyrum-client.js"
    assert served.read_bytes() == (CLIENT / "src" / "index.js").read_bytes(), (
        "copy clients/js/src/index.js to backplane/static/backplane/tyrum-client.js"
    )
