"""Token buckets with an explicit clock: every refusal and refill asserted exactly."""

from __future__ import annotations

from relay.ratelimit import RateLimiter, retry_after_header


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
