"""Per-client-address token buckets: `rate` tokens a second on average, bursts up to `burst`; a
request takes one token, or more where it costs the relay more (`cost`).

Pure arithmetic on a clock the caller passes in, so virtual-time tests can assert exact refusals.
Many members of a faction can share one address (a mobile carrier's NAT, a VPN), so the defaults are
generous and `rate = 0` turns the limit off.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

# Buckets kept at most: a flood from many addresses costs bounded memory; the least recently seen
# address is forgotten first (it comes back with a full bucket, which is the generous mistake).
MAX_TRACKED_ADDRESSES = 100_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class RateLimitStatistics:
    tracked_addresses: int
    refused: int


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, *, max_tracked: int = MAX_TRACKED_ADDRESSES) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_tracked = max_tracked
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._refused = 0

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, address: str, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens for `address`: 0.0 when allowed, else the seconds until they are there.

        A cost above the burst is taken as the burst, so that a full bucket always allows a request."""
        if not self.enabled:
            return 0.0
        cost = min(cost, float(self.burst))
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated_at) * self.rate_per_s)
            bucket.updated_at = now
        self._buckets[address] = bucket  # most recently seen last
        while len(self._buckets) > self._max_tracked:
            self._buckets.popitem(last=False)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        self._refused += 1
        return (cost - bucket.tokens) / self.rate_per_s

    def statistics(self) -> RateLimitStatistics:
        return RateLimitStatistics(len(self._buckets), self._refused)


def retry_after_header(wait_s: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it is never refused again."""
    return str(max(1, math.ceil(wait_s)))
