"""Unit tests of backplane/limits.py: the per-address throttle of failed authentications and
the rate limit of log lines (both pure: they take the time)."""

from __future__ import annotations

import logging

import pytest

from backplane.limits import AddressThrottle, LogLimiter


def test_address_throttle__blocks_past_the_burst_and_refills_at_its_rate() -> None:
    throttle = AddressThrottle(burst=3, per_minute=60)  # one a second
    assert not throttle.blocked("10.0.0.1", 0.0)
    for _ in range(3):
        throttle.failed("10.0.0.1", 0.0)
    assert throttle.blocked("10.0.0.1", 0.0)
    assert not throttle.blocked("10.0.0.2", 0.0)  # per address
    assert throttle.blocked("10.0.0.1", 0.5)
    assert not throttle.blocked("10.0.0.1", 1.0)  # one failure's worth came back


def test_address_throttle__remembers_a_bounded_number_of_addresses() -> None:
    throttle = AddressThrottle(burst=1, per_minute=1, max_addresses=100)
    for n in range(1000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(throttle.buckets) == 100
    assert throttle.blocked("10.0.3.231", 0.0)  # the most recent are kept
    assert not throttle.blocked("10.0.0.0", 0.0)  # the oldest were forgotten


def test_log_limiter__one_line_per_key_per_interval_then_the_count_held_back(caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter(interval=10.0)
    logger = logging.getLogger("tests.limits")
    with caplog.at_level(logging.INFO, logger="tests.limits"):
        for n in range(100):
            limiter.log(logger, logging.INFO, "refused_auth", n * 0.01, "refused: %s", "unknown token")
        limiter.log(logger, logging.INFO, "refused_host", 0.5, "refused: host")
        limiter.log(logger, logging.INFO, "refused_auth", 12.0, "refused: %s", "unknown token")
    lines = [(r.getMessage(), getattr(r, "action", None)) for r in caplog.records]
    assert lines == [
        ("refused: unknown token", "refused_auth"),
        ("refused: host", "refused_host"),
        ("refused: unknown token (and 99 more held back)", "refused_auth"),
    ]


def test_log_limiter__remembers_a_bounded_number_of_keys() -> None:
    limiter = LogLimiter(interval=10.0, max_keys=10)
    for n in range(50):
        assert limiter.allow(f"k{n}", 0.0) == 0
    assert len(limiter.last) == 10
