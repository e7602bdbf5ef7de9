"""``backplane_status --check``: thresholds, exit codes, outages as one line (backplane/status.py)."""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest
from django.utils import timezone

from backplane import status
from backplane.conf import conf
from backplane.models import Edge, RelayLease
from harness import procs, waits
from harness.data import events, publish_many
from harness.env import child_env

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

QUIET = status.Thresholds(lag_rows=(1000, 2000), pending_age_secs=(600, 1200), shards_unleased=(1, 1))


def healthy() -> None:
    """Return nothing: Redis answers (the check's Redis ping, replaced)."""


def lease_all(holder: str = "relay-1:1", age_secs: float = 0.0) -> None:
    beat = timezone.now() - timedelta(seconds=age_secs)
    for shard in range(conf.SHARDS):
        RelayLease.objects.update_or_create(shard=shard, defaults={"holder": holder, "heartbeat_at": beat})


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([procs.PYTHON, "manage.py", "backplane_status", "--check", *args], cwd=procs.ROOT,
                          env=child_env(**env), capture_output=True, text=True, timeout=60)


def test_check__ok_when_every_shard_has_a_live_relay_and_nothing_waits(services):
    lease_all()
    verdict = status.check(QUIET, ping=healthy)
    assert (verdict.level, verdict.problems) == (status.OK, [])


def test_check__lag_past_the_critical_threshold_is_critical(services, tenant_factory):
    lease_all()
    publish_many(tenant_factory(), events(3, "check.lag"))
    verdict = status.check(status.Thresholds(lag_rows=(2, 3), pending_age_secs=(600, 1200)), ping=healthy)
    assert verdict.level == status.CRITICAL
    assert verdict.problems == ["CRITICAL: outbox lag 3 rows (warning 2, critical 3)"]
    verdict = status.check(status.Thresholds(lag_rows=(2, 30), pending_age_secs=(600, 1200)), ping=healthy)
    assert (verdict.level, len(verdict.problems)) == (status.WARNING, 1)


def test_check__stale_and_released_leases_count_as_shards_without_a_relay(services):
    lease_all()
    RelayLease.objects.filter(shard__in=[2, 3, 4]).update(heartbeat_at=timezone.now() - timedelta(seconds=60))
    RelayLease.objects.filter(shard=9).update(holder="")  # released by a relay that stopped
    verdict = status.check(QUIET, ping=healthy)
    assert verdict.level == status.CRITICAL
    assert verdict.problems == [f"CRITICAL: 4 of {conf.SHARDS} shards without a live relay: 2-4,9"]


def test_check__a_silent_edge_is_a_warning(services):
    lease_all()
    Edge.objects.create(edge_id="edge-gone")
    Edge.objects.filter(edge_id="edge-gone").update(heartbeat_at=timezone.now() - timedelta(seconds=120))
    Edge.objects.create(edge_id="edge-live")
    verdict = status.check(QUIET, ping=healthy)
    assert (verdict.level, verdict.problems) == (status.WARNING, ["WARNING: 1 edges silent for 30s or more: edge-gone"])


def test_check__redis_down_is_one_critical_line(services):
    lease_all()

    def down() -> None:
        raise ConnectionError("refused")

    verdict = status.check(QUIET, ping=down)
    assert (verdict.level, verdict.problems) == (status.CRITICAL, ["CRITICAL: redis unreachable (ConnectionError)"])


def test_backplane_status__check_exits_by_level_with_one_line_per_problem(services):
    lease_all()
    ok = run_check()
    assert (ok.returncode, ok.stdout.strip()) == (0, "OK: backplane healthy"), ok.stderr[-2000:]
    RelayLease.objects.filter(shard=0).update(holder="")
    unleased = run_check("--max-unleased-shards", "1,5")
    assert unleased.returncode == 1, unleased.stderr[-2000:]
    assert unleased.stdout.splitlines() == [f"WARNING: 1 of {conf.SHARDS} shards without a live relay: 0"]


def test_backplane_status__outages_are_one_line_and_a_non_zero_exit_not_a_traceback(services):
    closed = waits.free_port()
    redis_down = run_check(REDIS_URL=f"redis://127.0.0.1:{closed}/7")
    assert redis_down.returncode == 2
    assert "CRITICAL: redis unreachable (ConnectionError)" in redis_down.stdout.splitlines()
    assert "Traceback" not in redis_down.stderr
    db_down = run_check(DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed}/nothing")
    assert db_down.returncode == 2, db_down.stderr[-2000:]
    assert db_down.stdout.splitlines()[-1] == "CRITICAL: database unreachable (OperationalError)"
    assert "Traceback" not in db_down.stderr
    plain = subprocess.run([procs.PYTHON, "manage.py", "backplane_status"], cwd=procs.ROOT,
                           env=child_env(DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed}/nothing"),
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == ["CommandError: database unreachable (OperationalError)"]


def test_backplane_status__shards_in_the_same_state_collapse_to_one_line(services):
    lease_all()
    RelayLease.objects.filter(shard__gte=8).update(holder="relay-2:2")
    out = subprocess.run([procs.PYTHON, "manage.py", "backplane_status"], cwd=procs.ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    shard_lines = [line.split()[:3] for line in out.stdout.splitlines() if line.startswith("  shard")]
    assert shard_lines == [["shard", "0-7", "relay-1:1"], ["shard", f"8-{conf.SHARDS - 1}", "relay-2:2"]]
