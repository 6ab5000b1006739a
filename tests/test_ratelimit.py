"""Token buckets with an explicit clock: every refusal and refill asserted exactly."""

from __future__ import annotations

import pytest

from relay.config import LimitsConfig
from relay.http.admission import REQUEST_COSTS
from relay.http.ratelimit import RateLimiter, retry_after_header

pytestmark = pytest.mark.unit


def test_a_burst_is_allowed_then_the_rate_applies() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.acquire("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a", 0.0) == 0.5
    assert limiter.acquire("a", 0.5) == 0.0
    assert limiter.acquire("a", 0.5) == 0.5
    assert limiter.statistics().refused == 2


def test_addresses_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.acquire("a", 0.0) == 0.0
    assert limiter.acquire("b", 0.0) == 0.0
    assert limiter.acquire("a", 0.0) == 1.0


def test_refill_never_exceeds_the_burst() -> None:
    limiter = RateLimiter(rate_per_s=10.0, burst=2)
    limiter.acquire("a", 0.0)
    assert [limiter.acquire("a", 1000.0) for _ in range(3)] == [0.0, 0.0, 0.1]


def test_rate_zero_turns_it_off() -> None:
    limiter = RateLimiter(rate_per_s=0.0, burst=0)
    assert all(limiter.acquire("a", 0.0) == 0.0 for _ in range(1000))
    assert not limiter.enabled


def test_memory_is_bounded_by_forgetting_the_least_recently_seen() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_tracked=2)
    limiter.acquire("a", 0.0)
    limiter.acquire("b", 0.0)
    limiter.acquire("a", 0.0)  # refused, and now the most recent
    limiter.acquire("c", 0.0)  # forgets b
    assert limiter.statistics().tracked_addresses == 2
    assert limiter.acquire("a", 0.0) > 0.0  # remembered: still empty
    assert limiter.acquire("b", 0.0) == 0.0  # forgotten: a full bucket again


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.01, 1.0, 1.2)] == ["1", "1", "1", "2"]


def test_a_costly_request_takes_its_cost_in_tokens() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=12)
    assert limiter.acquire("a", 0.0, cost=10) == 0.0
    assert limiter.acquire("a", 0.0, cost=10) == 4.0  # 8 tokens short, at 2 a second
    assert limiter.acquire("a", 0.0) == 0.0  # a plain request still fits in what is left
    assert limiter.acquire("a", 5.0, cost=10) == 0.0


def test_a_cost_above_the_burst_is_allowed_with_a_full_bucket() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=3)
    assert limiter.acquire("a", 0.0, cost=10) == 0.0
    assert limiter.acquire("a", 0.0, cost=10) == 3.0


def test_prometheus_and_the_status_page_are_never_refused_at_the_defaults() -> None:
    """One address scraping /metrics every second (Prometheus's usual interval is 15 s or more) while
    the status page there refreshes /status every 5 s, for an hour at the default limits."""
    defaults = LimitsConfig()
    limiter = RateLimiter(defaults.client_rate, defaults.client_burst)
    waits = []
    for second in range(3600):
        waits.append(limiter.acquire("prometheus", float(second), REQUEST_COSTS["/metrics"]))
        if second % 5 == 0:
            waits.append(limiter.acquire("prometheus", float(second), REQUEST_COSTS["/status"]))
    assert set(waits) == {0.0}
    assert limiter.statistics().refused == 0
