"""Fixtures of the failure matrix (see harness.py and checker.py).

The test database comes from tests/conftest.py's ``test_database``/``e2e_db`` (created even
when only this directory is collected, never the configured non-test database).
Figures of every scenario are printed at the end of the run (one line each) and written as
JSON to ``$FAULTS_RESULTS`` if set, else to ``faults.json`` in pytest's base temp dir.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from faults.harness import Scenario
from faults.services import PrivatePostgres, PrivateRedis

RESULTS: list[dict[str, Any]] = []
SUMMARY: list[str] = []
RESULTS_PATH: list[Path] = []


@pytest.fixture(scope="session")
def faults_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """Collects every scenario's report; written as JSON when the session ends."""
    yield RESULTS
    if not RESULTS:
        return
    path = Path(os.environ.get("FAULTS_RESULTS") or tmp_path_factory.getbasetemp() / "faults.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "suite": "tests/faults",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version()},
        "scenarios": RESULTS,
    }, indent=2, default=str) + "\n")
    RESULTS_PATH.append(path)


@pytest.fixture
async def scenario(module_env: dict[str, str], tmp_path: Path,
                   faults_results: list[dict[str, Any]]) -> AsyncIterator[Callable[..., Scenario]]:
    """``scenario(name, **env)`` makes a Scenario; its processes are stopped by PID after the
    test, and its report (if it got one) joins the run's results."""
    made: list[Scenario] = []

    def make(name: str, **env: str) -> Scenario:
        db = module_env["DATABASE_URL"].rsplit("/", 1)[-1]
        assert env.get("DATABASE_URL") or db.startswith("test_"), f"not a test database: {db}"
        work = tmp_path / name
        (work / "logs").mkdir(parents=True)
        sc = Scenario(name, {**module_env, **env}, work / "logs", work)
        made.append(sc)
        return sc

    yield make
    for sc in made:
        await sc.close()
        if sc.checker.report:
            report = dict(sc.checker.report)
            faults_results.append(report)
            SUMMARY.append(sc.checker.summary())


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test only (never the machine's shared one on 6379)."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL instance of this test only (never the machine's own)."""
    pg = PrivatePostgres()
    try:
        pg.init()
        yield pg
    finally:
        pg.destroy()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARY:
        return
    terminalreporter.section("failure matrix figures")
    for line in SUMMARY:
        terminalreporter.write_line(line)
    for path in RESULTS_PATH:
        terminalreporter.write_line(f"figures written to {path}")

