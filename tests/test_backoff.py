"""The delay policy with a seeded random source: every delay asserted exactly."""

from __future__ import annotations

import random

import pytest

from relay.upstream.backoff import Backoff

pytestmark = pytest.mark.unit


def expected_uniforms(seed: int, bounds: list[tuple[float, float]]) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(low, high) for low, high in bounds]


def test_delays_double_under_full_jitter_until_the_cap() -> None:
    backoff = Backoff(1.0, 10.0, random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert delays == expected_uniforms(7, [(0.0, ceiling) for ceiling in ceilings])
    assert all(0.0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    assert backoff.failures == 6


def test_reset_starts_over_from_the_initial_delay() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(1))
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.ceiling() == 1.0
    assert backoff.failures == 0


def test_capped_delay_stays_between_half_and_full_cap() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(3))
    delays = [backoff.capped_delay() for _ in range(50)]
    assert delays == expected_uniforms(3, [(30.0, 60.0)] * 50)
    assert min(delays) >= 30.0


def test_an_endless_outage_does_not_overflow() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(0))
    backoff.failures = 10_000
    assert backoff.ceiling() == 60.0
    assert 0.0 <= backoff.next_delay() <= 60.0
