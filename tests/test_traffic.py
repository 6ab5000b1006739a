"""Per-faction traffic counts, with the times given explicitly (pure units)."""

from __future__ import annotations

import pytest

from relay.traffic import MEMBER_WINDOW_S, MIN_PRUNE_AT, RATE_MINUTES, Source, Traffic

pytestmark = pytest.mark.unit

FACTION = 46666


def test_events_per_minute_shift_with_time_and_forget_after_the_window() -> None:
    traffic = Traffic()
    traffic.stored(FACTION, Source.UPSTREAM, 2, now=600.0)  # minute 10
    traffic.stored(FACTION, Source.PUBLISHED, 1, now=659.0)  # still minute 10
    traffic.stored(FACTION, Source.RECONCILE, 4, now=780.0)  # minute 13
    rates = traffic.statistics(now=800.0)[FACTION].events_per_minute
    assert len(rates) == RATE_MINUTES
    assert rates[-4:] == [3, 0, 0, 4]
    assert sum(rates) == 7
    later = traffic.statistics(now=780.0 + 60 * RATE_MINUTES)[FACTION]
    assert later.events_per_minute == [0] * RATE_MINUTES
    assert later.stored == {Source.UPSTREAM: 2, Source.PUBLISHED: 1, Source.RECONCILE: 4}


def test_members_are_addresses_seen_within_the_window_or_holding_a_stream() -> None:
    traffic = Traffic()
    traffic.seen(FACTION, "198.51.100.1", now=0.0)
    traffic.seen(FACTION, "198.51.100.1", now=10.0)
    traffic.seen(FACTION, "198.51.100.2", now=10.0)
    traffic.stream_opened(FACTION, "198.51.100.3", now=10.0)
    traffic.stream_opened(FACTION, "198.51.100.3", now=11.0)
    assert traffic.statistics(now=20.0)[FACTION].members == 3
    # Past the window only the open streams count, and a second stream from one address is one member.
    assert traffic.statistics(now=11.0 + MEMBER_WINDOW_S)[FACTION].members == 1
    traffic.stream_closed(FACTION, "198.51.100.3")
    assert traffic.statistics(now=11.0 + MEMBER_WINDOW_S)[FACTION].members == 1
    traffic.stream_closed(FACTION, "198.51.100.3")
    assert traffic.statistics(now=11.0 + MEMBER_WINDOW_S)[FACTION].members == 0


def test_addresses_seen_are_pruned_as_they_grow_without_a_reader() -> None:
    traffic = Traffic()
    for n in range(10 * MIN_PRUNE_AT):
        # Each address polls once and moves on, a window apart: only the recent ones stay.
        traffic.seen(FACTION, f"10.0.{n // 256}.{n % 256}", now=n * MEMBER_WINDOW_S / MIN_PRUNE_AT)
    assert len(traffic._factions[FACTION].seen) <= 2 * MIN_PRUNE_AT


def test_served_and_upstream_changes_are_per_faction() -> None:
    traffic = Traffic()
    traffic.upstream_changed(FACTION, now=5.0)
    traffic.served(FACTION, 3, now=6.0)
    traffic.served(FACTION, 2, now=7.0)
    traffic.served(11581, 1, now=7.0)
    stats = traffic.statistics(now=8.0)
    assert (stats[FACTION].served, stats[FACTION].last_upstream_change_at) == (5, 5.0)
    assert (stats[11581].served, stats[11581].last_upstream_change_at) == (1, None)
