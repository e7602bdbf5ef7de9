"""The image and the cluster kit, checked as files: deploy/compose.yaml's services, commands,
healthchecks and start order (and ``docker compose config`` where Docker exists), nginx's
upgrade headers, the Dockerfile's stages, user and dependencies, and the pins of the
transitive dependencies whose internals the code relies on."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
TOOLING = {"pytest", "pytest-django", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff", "mypy", "django-stubs"}
RELIED_ON = {"twisted", "autobahn", "asgiref", "msgpack", "redis"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def pins(source: Path | str) -> dict[str, str]:
    """``name==version`` lines of a requirements or constraints file (or its text), names normalised."""
    found = {}
    for line in (source.read_text() if isinstance(source, Path) else source).splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#;]+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def runtime_requirements() -> dict[str, str]:
    """What the image installs: requirements.txt up to its tooling section (the Dockerfile's sed)."""
    text = (ROOT / "requirements.txt").read_text()
    assert "\n# Tests and tooling\n" in text, "the Dockerfile cuts requirements.txt at this line"
    return pins(text.split("\n# Tests and tooling\n")[0])


def test_compose__services_and_their_commands():
    services = compose()["services"]

    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "edge-a",
        "edge-b",
        "relay-a",
        "relay-b",
        "compactor",
        "proxy",
    }
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--no-input"]
    assert services["migrate"]["restart"] == "no"
    for edge in ("edge-a", "edge-b"):
        assert services[edge]["command"][:3] == ["python", "-m", "backplane.run_edge"]  # daphne on uvloop
        assert "tyrum.asgi:application" in services[edge]["command"]
        assert services[edge]["environment"]["EDGE_ID"] == edge
    for relay in ("relay-a", "relay-b"):
        assert services[relay]["command"] == ["python", "manage.py", "run_backplane"]
    assert "manage.py compact_outbox" in " ".join(services["compactor"]["command"])
    assert "sleep" in " ".join(services["compactor"]["command"])  # on a schedule, not once


def test_compose__secrets_come_from_the_environment_and_redis_has_a_password():
    services = compose()["services"]
    env = services["edge-a"]["environment"]

    assert env["SECRET_KEY"].startswith("${SECRET_KEY:?")
    assert env["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    assert "--requirepass" in " ".join(services["redis"]["command"])
    assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
    assert "deploy/.env" in (ROOT / ".gitignore").read_text()


def test_compose__every_long_running_service_has_a_healthcheck():
    services = compose()["services"]

    for name, service in services.items():
        check = service.get("healthcheck", {})
        if name == "migrate":
            assert check == {"disable": True}
        else:
            assert check.get("test"), f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["edge-a"]["healthcheck"]["test"])


def test_compose__comes_up_in_order():
    services = compose()["services"]

    def after(name: str) -> dict[str, str]:
        return {dep: cond["condition"] for dep, cond in services[name]["depends_on"].items()}

    assert after("migrate") == {"postgres": "service_healthy", "redis": "service_healthy"}
    for name in ("edge-a", "edge-b", "relay-a", "relay-b", "compactor"):
        assert after(name) == {
            "migrate": "service_completed_successfully",
            "postgres": "service_healthy",
            "redis": "service_healthy",
        }, name
    assert after("proxy") == {"edge-a": "service_healthy", "edge-b": "service_healthy"}


def test_compose__the_proxy_passes_websocket_upgrades_to_both_edges():
    proxy = compose()["services"]["proxy"]
    [mount] = proxy["volumes"]
    conf = (COMPOSE.parent / mount.split(":")[0]).read_text()

    assert set(re.findall(r"server (edge-[ab]):8000", conf)) == {"edge-a", "edge-b"}
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    assert "proxy_http_version 1.1;" in conf
    assert (
        re.search(r"proxy_read_timeout (\d+)s;", conf) and int(re.search(r"proxy_read_timeout (\d+)s;", conf)[1]) > 20
    )


def has_docker_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    out = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)  # noqa: S603, S607
    return out.returncode == 0


@pytest.mark.skipif(not has_docker_compose(), reason="no Docker Compose here; the parsed YAML is checked above")
def test_compose__docker_compose_config_accepts_it():
    env = {"SECRET_KEY": "x", "POSTGRES_PASSWORD": "x", "REDIS_PASSWORD": "x", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    out = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],  # noqa: S603, S607
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_dockerfile__multi_stage_non_root_with_a_healthcheck_and_static_files():
    text = (ROOT / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]

    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root)\w+", final, re.M)
    assert re.search(r"^HEALTHCHECK .*", final, re.M) and "/livez" in final
    assert "collectstatic" in text
    assert "-c constraints.txt" in text and "sed '/^# Tests and tooling/,$d' requirements.txt" in text
    assert not re.search(r"^COPY (tests|bench|harness)", text, re.M)


def test_image__installs_runtime_dependencies_only():
    runtime = runtime_requirements()

    assert {"django", "channels", "channels-redis", "daphne", "whitenoise"} <= set(runtime)
    assert not TOOLING & set(runtime)
    assert TOOLING <= set(pins(ROOT / "requirements.txt"))  # still pinned, for `make install`


def test_constraints__pin_what_the_code_relies_on_as_installed():
    pinned = {**pins(ROOT / "requirements.txt"), **pins(ROOT / "constraints.txt")}

    assert RELIED_ON <= set(pinned)
    for name in RELIED_ON:
        assert importlib.metadata.version(name) == pinned[name], name
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_dockerignore__keeps_the_venv_and_tests_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())

    assert {".venv", ".git", "tests", "var"} <= ignored


@pytest.mark.parametrize("doc", ["install.md", "deploy.md"])
def test_docs__every_relative_link_resolves(doc):
    path = ROOT / "docs" / doc
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())

    relative = [link for link in links if "://" not in link]
    assert relative
    for link in relative:
        assert (path.parent / link).exists(), link


def test_deploy_doc__names_every_compose_service_command():
    text = (ROOT / "docs" / "deploy.md").read_text()

    for command in (
        "manage.py migrate",
        "run_backplane",
        "compact_outbox",
        "tyrum.asgi:application",
        "--proxy-headers",
    ):
        assert command in text
