"""Kept only for tests that still ``import support`` (tests/integration/test_compaction.py):
every name here is the ``harness`` package's. New code imports ``harness`` directly."""

from harness.env import child_env
from harness.procs import PYTHON, ROOT, Proc, manage
from harness.waits import free_port, wait_for, wait_port

__all__ = ["PYTHON", "ROOT", "Proc", "child_env", "free_port", "manage", "wait_for", "wait_port"]
