"""Limits on what one client can make an edge do, and on what the edge writes about it: pure
(they take the time), one instance per edge process.

- ``AddressThrottle``: failed authentications per client address. Past a burst and a rate,
  the address's upgrades are refused (429) before any database query: a credential-stuffing
  client costs the database nothing.
- ``LogLimiter``: at most one log line per kind per interval, with how many it held back: a
  flood of refusals cannot fill the disk.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any

from backplane.delivery import TokenBucket


class AddressThrottle:
    """A token bucket per client address, spent by each failed authentication.

    At most ``max_addresses`` are remembered (the least recently failing go first), so a
    client cycling through addresses cannot grow the edge's memory."""

    def __init__(self, burst: float, per_minute: float, max_addresses: int = 10_000) -> None:
        self.burst, self.rate = burst, per_minute / 60.0
        self.max_addresses = max_addresses
        self.buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def blocked(self, address: str, now: float) -> bool:
        """Whether upgrades from ``address`` are refused now (no token left)."""
        bucket = self.buckets.get(address)
        if bucket is None:
            return False
        bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.at) * bucket.rate)
        bucket.at = now
        return bucket.tokens < 1.0

    def failed(self, address: str, now: float) -> None:
        """Spend a token of ``address`` for one failed authentication."""
        bucket = self.buckets.get(address)
        if bucket is None:
            bucket = self.buckets[address] = TokenBucket(self.rate, self.burst, now)
            while len(self.buckets) > self.max_addresses:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(address)
        bucket.take(now)


class LogLimiter:
    """Let through one log line per ``key`` every ``interval`` seconds; count the others and
    say how many were held back on the next line that goes through."""

    def __init__(self, interval: float = 10.0, max_keys: int = 1000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.last: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def allow(self, key: str, now: float) -> int | None:
        """None to hold this line back; else how many lines of ``key`` were held back since
        the last one let through."""
        at, held = self.last.get(key, (float("-inf"), 0))
        if now - at < self.interval:
            self.last[key] = (at, held + 1)
            return None
        self.last[key] = (now, 0)
        self.last.move_to_end(key)
        while len(self.last) > self.max_keys:
            self.last.popitem(last=False)
        return held

    def log(self, logger: logging.Logger, level: int, key: str, now: float, msg: str, *args: Any, **extra: Any) -> None:
        """``logger.log(level, msg, *args)`` unless held back; ``extra`` goes to the record."""
        held = self.allow(key, now)
        if held is None:
            return
        if held:
            msg += " (and %d more held back)"
            args = (*args, held)
        logger.log(level, msg, *args, extra={"action": key, **extra})


@functools.cache
def throttle() -> AddressThrottle:
    """This process's throttle of failed authentications per client address (the settings
    are read at first use)."""
    from backplane.conf import conf

    return AddressThrottle(float(conf.AUTH_FAILURE_BURST), float(conf.AUTH_FAILURES_PER_MINUTE))


def client_address(scope: Any) -> str:
    """The client's address as the server saw it (daphne's ``--proxy-headers`` puts the
    forwarded one here: behind a proxy, it must overwrite X-Forwarded-For, docs/security.md)."""
    client = scope.get("client") or ("",)
    return str(client[0])
