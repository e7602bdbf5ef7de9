"""A Django team adopting the backplane: the built wheel in a scratch virtualenv, a fresh
``startproject``, exactly the steps of docs/install.md, then an event published inside a
transaction reaches a peer: under ``serve`` (SQLite, in-process layer), and on PostgreSQL and
Redis with a daphne edge and ``run_backplane``.

The scratch virtualenv sees the project venv's packages through a ``.pth`` file (offline and
fast) and installs the wheel with ``--no-index``: pip resolves the wheel's declared dependency
ranges against the pinned versions, so a range that excludes them fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import waits
from harness.peer import Peer
from harness.procs import ROOT

pytestmark = pytest.mark.e2e

INSTALL_MD = ROOT / "docs" / "install.md"
PROJECT = "mysite"  # the name docs/install.md's blocks use
STEP_TIMEOUT_SECS = 120
EVENT_TIMEOUT_SECS = 15
RELAY_POLL_SECS = 60  # the cluster test's: far above EVENT_TIMEOUT_SECS


@dataclass
class Adopted:
    python: Path
    project: Path
    wheel: Path
    env: dict[str, str]

    def manage(self, *args: str, stderr: bool = False) -> str:
        return run([str(self.python), "manage.py", *args], cwd=self.project, env=self.env, stderr=stderr)

    def start(self, name: str, args: list[str], log_dir: Path) -> subprocess.Popen[bytes]:
        with open(log_dir / f"{name}.log", "wb") as log:
            return subprocess.Popen(
                [str(self.python), *args],
                cwd=self.project,
                env=self.env,  # noqa: S603
                stdout=log,
                stderr=subprocess.STDOUT,
            )


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, *, stderr: bool = False) -> str:
    """Run a step; return its stdout (and stderr, where the system checks' messages go)."""
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_SECS)  # noqa: S603
    assert out.returncode == 0, f"{' '.join(args[:4])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout + (out.stderr if stderr else "")


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM by PID, SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def install_steps() -> tuple[list[tuple[str, str]], list[str]]:
    """docs/install.md's file blocks (path under the project, text) and console commands."""
    text = INSTALL_MD.read_text()
    blocks = re.findall(r'```python title="mysite/([^"]+)"\n(.*?)```', text, re.S)
    commands = [
        line[2:].strip()
        for block in re.findall(r"```console\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith("$ ")
    ]
    return blocks, commands


def build_wheel(out: Path) -> Path:
    """Build the wheel from a clean copy of what it is made of (no stale build/ tree)."""
    src = out / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "backplane", src / "backplane", ignore=shutil.ignore_patterns("__pycache__"))
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        cwd=out,
    )
    [wheel] = out.glob("tyrum_backplane-*.whl")
    return wheel


def scratch_venv(path: Path, visible: str) -> tuple[Path, Path]:
    """A virtualenv without pip that also sees the packages in ``visible`` (a ``.pth`` file);
    return its python and site-packages."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).strip())
    (site / "visible.pth").write_text(f"{visible}\n")
    return python, site


def pip_install(python: Path, wheelhouse: Path, name: str) -> None:
    """Install ``name`` from ``wheelhouse`` alone, its dependencies from what ``python`` sees."""
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            name,
        ],
        cwd=wheelhouse,
    )


def child_env(project: Path) -> dict[str, str]:
    """A clean environment: nothing of this test run's settings (DJANGO_SETTINGS_MODULE, BACKPLANE_*)."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    return {
        **env,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DJANGO_SETTINGS_MODULE": f"{PROJECT}.settings",
    }


@pytest.fixture(scope="module")
def adopted(tmp_path_factory: pytest.TempPathFactory) -> Adopted:
    """A fresh project with the backplane added by docs/install.md's steps, not yet migrated."""
    tmp = tmp_path_factory.mktemp("adopt")
    wheel = build_wheel(tmp / "dist")
    python, _site = scratch_venv(tmp / "venv", sysconfig.get_paths()["purelib"])
    blocks, commands = install_steps()
    assert commands[0] == "pip install tyrum-backplane", commands
    pip_install(python, wheel.parent, "tyrum-backplane")
    project = tmp / "project"
    project.mkdir()
    run([str(python), "-m", "django", "startproject", PROJECT, str(project)], cwd=tmp)
    assert blocks, "docs/install.md has no file blocks"
    for relative, text in blocks:
        with open(project / PROJECT / relative, "a") as f:
            f.write("\n" + text)
    assert commands[1:] == ["python manage.py migrate", "python manage.py serve"], commands
    return Adopted(python, project, wheel, child_env(project))


def test_wheel__holds_the_backplane_package_alone(adopted: Adopted) -> None:
    names = zipfile.ZipFile(adopted.wheel).namelist()
    tops = {name.split("/")[0] for name in names}

    assert {top for top in tops if not top.endswith(".dist-info")} == {"backplane"}
    assert "backplane/store/sql/bp_assign_v3.sql" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    imported = run([str(adopted.python), "-c", "import backplane; print(backplane.__file__)"], cwd=adopted.project)
    assert imported.startswith(str(adopted.python.parent.parent)), imported  # the wheel's copy, not the repository's


async def publish_and_receive(adopted: Adopted, url: str, tenant: str) -> None:
    adopted.manage("create_tenant", tenant.title())
    token = adopted.manage("create_token", "--tenant", tenant, "--device", "dev-1", "--role", "client").split()[-1]
    peer = await Peer.open(url, token)
    try:
        assert peer.hello["protocol"] == "tyrum-v1"
        code = (
            "from django.db import transaction\nfrom backplane import publish\n"
            "with transaction.atomic():\n"
            f"    print(publish({tenant!r}, 'run.updated', {{'n': 1}}, device='dev-1'))\n"
            # A one-shot producer: the doorbell rings before the process exits (its atexit flush).
        )
        event_id = (await asyncio.to_thread(adopted.manage, "shell", "-c", code)).split()[-1]
        [event] = await peer.until_events(1, timeout=EVENT_TIMEOUT_SECS)
        assert (event["stream"], event["offset"], event["event"]["event_id"]) == ("device", 1, event_id)
    finally:
        await peer.close()


async def test_adoption__serve_delivers_an_event_published_in_a_transaction(adopted: Adopted, tmp_path: Path) -> None:
    adopted.manage("migrate", "--no-input", "-v", "0")
    port = waits.free_port()
    serve = adopted.start("serve", ["manage.py", "serve", "--port", str(port)], tmp_path)
    try:
        waits.wait_port(port, timeout=30)
        await publish_and_receive(adopted, f"ws://127.0.0.1:{port}/ws", "embedded-co")
        for probe in ("/livez", "/readyz"):  # by IP address, which ALLOWED_HOSTS ([] with DEBUG) refuses
            assert await asyncio.to_thread(http_status, port, probe, "10.9.8.7") == 200
    finally:
        code = stop(serve)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def http_status(port: int, path: str, host: str) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def relay_holds_shards(adopted: Adopted) -> bool:
    """True once the relay holds its shards (it has run its first cycle and waits for the doorbell)."""
    status = json.loads(adopted.manage("backplane_status", "--json"))
    return any(lease["live"] for lease in status["leases"])


@pytest.fixture
def cluster_settings(adopted: Adopted) -> Iterator[None]:
    """The host's own cluster settings (not install.md's): a scratch PostgreSQL database and
    Redis through CHANNEL_LAYERS only, so the doorbell must find Redis there."""
    import psycopg
    from django.conf import settings

    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql") or not settings.REDIS_URL:
        pytest.fail("the cluster adoption test needs DATABASE_URL=postgres://… and REDIS_URL (run it with `make test`)")
    db = settings.DATABASES["default"]
    name = f"tyrum_adopt_{os.getpid()}"
    admin = (
        f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/postgres"
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    settings_py = adopted.project / PROJECT / "settings.py"
    original = settings_py.read_text()
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": db.get("USER") or "postgres",
        "PASSWORD": db.get("PASSWORD") or "",
        "HOST": db.get("HOST") or "127.0.0.1",
        "PORT": str(db.get("PORT") or 5432),
    }
    # As docs/install.md says for a cluster: Redis with the messages' encryption keys.
    layer = {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [settings.REDIS_URL],
            "prefix": f"{settings.BACKPLANE_CHANNEL_PREFIX}adopt:",
            "symmetric_encryption_keys": ["adoption-test-redis-key-0123456789abcdef"],
        },
    }
    settings_py.write_text(
        original + f"\nDATABASES = {{'default': {database!r}}}\nCHANNEL_LAYERS = {{'default': {layer!r}}}\n"
        f"BACKPLANE_CHANNEL_PREFIX = {settings.BACKPLANE_CHANNEL_PREFIX + 'adopt'!r}\n"
        # Longer than the peer waits: only the doorbell, on the layer's Redis, can deliver in time.
        f"BACKPLANE['RELAY_POLL_INTERVAL_SECS'] = {RELAY_POLL_SECS}\n"
    )
    try:
        yield
    finally:
        settings_py.write_text(original)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_adoption__daphne_edge_and_relay_on_postgresql_and_redis(
    adopted: Adopted, cluster_settings: None, tmp_path: Path
) -> None:
    adopted.manage("migrate", "--no-input", "-v", "0")
    checked = adopted.manage("check", "--deploy", "--fail-level", "ERROR", stderr=True)
    assert "security.W" in checked  # the messages are in what is read here (startproject's settings are not --deploy's)
    assert "backplane.W060" not in checked  # the doorbell found Redis in CHANNEL_LAYERS
    port = waits.free_port()
    edge = adopted.start(
        "edge", ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), f"{PROJECT}.asgi:application"], tmp_path
    )
    relay = adopted.start("relay", ["manage.py", "run_backplane"], tmp_path)
    try:
        waits.wait_port(port, timeout=30)
        await asyncio.to_thread(waits.wait_for, lambda: relay_holds_shards(adopted), 60, 0.5, "the relay's shards")
        await publish_and_receive(adopted, f"ws://127.0.0.1:{port}/ws", "cluster-co")
    finally:
        codes = {"edge": stop(edge), "relay": stop(relay)}
    logs = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in codes}
    for name, log in logs.items():
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"
    assert codes["relay"] == 0, logs["relay"][-3000:]


def test_sdk__client_distribution_installs_and_imports_without_django(tmp_path: Path) -> None:
    src = tmp_path / "sdk"
    shutil.copytree(ROOT / "sdk" / "python", src, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("tyrum_backplane_client-*.whl")
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert names == {"backplane/__init__.py", "backplane/client.py", "backplane/protocol.py"}

    # A virtualenv that sees websockets (and its metadata) from the project venv, and nothing else of it.
    only = tmp_path / "only-websockets"
    only.mkdir()
    import websockets

    project_site = Path(websockets.__file__).parent.parent
    for entry in [project_site / "websockets", *project_site.glob("websockets-*.dist-info")]:
        (only / entry.name).symlink_to(entry)
    python, site = scratch_venv(tmp_path / "venv", str(only))
    pip_install(python, tmp_path, "tyrum-backplane-client")

    code = (
        "import importlib.util, backplane.client\n"
        "print(backplane.client.__file__, importlib.util.find_spec('django') is None)"
    )
    out = run([str(python), "-c", code], cwd=tmp_path).split()
    assert out == [str(site / "backplane" / "client.py"), "True"]
