"""The deafness watch's decision on virtual time: a faction whose rows differ upstream and that heard
nothing through the grace is deaf, unless its socket holds bytes not yet read (the relay is behind,
under load: its changes are on their way). A false alarm rejoins the whole project, which is the last
thing an overloaded relay needs.

The REST reads (snapshot and probe) are the injected upstream; the reconcilers and the watch are the
relay's own. No worker threads: the clock is a MockClock with autojump.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from relay.config import ChannelConfig
from relay.upstream.backoff import Backoff
from relay.upstream.deafness import DeafWatch
from relay.upstream.reconcile import Reconciler
from relay.upstream.snapshot import Probe, Snapshot

pytestmark = pytest.mark.virtual_time

FACTION = 46666
CHANNELS = (ChannelConfig("war_calls", "faction_id=eq.{faction_id}", "id"),)
INTERVAL_S, GRACE_S = 40.0, 10.0


class Upstream:
    """Rows per faction as the project holds them, read by snapshots and probes."""

    def __init__(self) -> None:
        self.keys: list[int] = [1, 2]

    async def snapshot(self, table: str, filter_: str, key: str) -> Snapshot:
        del table, filter_, key
        return Snapshot([{"id": k, "faction_id": FACTION} for k in self.keys], requests=1)

    async def probe(self, table: str, filters: list[tuple[str, str]], key: str) -> Probe:
        del table, filters, key
        return Probe(len(self.keys), max(self.keys, default=None), bytes=10)


async def nothing_to_apply(
    faction_id: int, table: str, rows: list[dict[str, Any]], skip: AbstractSet[Any], at: str
) -> int:
    del faction_id, table, rows, skip, at
    return 0


def watching(upstream: Upstream) -> tuple[DeafWatch, Reconciler, list[Sequence[int]]]:
    found: list[Sequence[int]] = []

    def on_deaf(factions: Sequence[int]) -> int:
        found.append(factions)
        return len(factions)

    watch = DeafWatch(
        CHANNELS,
        upstream.probe,
        interval_s=INTERVAL_S,
        grace_s=GRACE_S,
        wall_clock_ms=lambda: 0,
        on_deaf=on_deaf,
    )
    reconciler = Reconciler(
        FACTION,
        CHANNELS,
        upstream.snapshot,
        nothing_to_apply,
        interval_s=300.0,
        backoff=Backoff(1.0, 60.0),
        wall_clock_ms=lambda: 0,
        watch=watch,
    )
    return watch, reconciler, found


@asynccontextmanager
async def live(upstream: Upstream) -> AsyncIterator[tuple[DeafWatch, Reconciler, list[Sequence[int]]]]:
    """The faction live, its first reconcile read (rows 1 and 2) and the first probe round agreeing,
    until the block ends."""
    watch, reconciler, found = watching(upstream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconciler.run_while_live)
        await trio.sleep(1.0)
        yield watch, reconciler, found
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("unread_bytes", [0, 512])
async def test_a_silent_faction_that_differs_is_deaf_unless_its_socket_holds_unread_bytes(
    autojump_clock: trio.testing.MockClock, unread_bytes: int
) -> None:
    upstream = Upstream()
    async with live(upstream) as (watch, reconciler, found):
        reconciler.unread_upstream = lambda: unread_bytes
        assert reconciler.heard_of("war_calls") == (2, 2)
        upstream.keys.append(3)  # committed upstream, never heard
        await trio.sleep(INTERVAL_S + GRACE_S + 1.0)  # one round and its grace
        stats = watch.statistics()
    if unread_bytes:
        assert (found, stats.deaf_found, stats.behind) == ([], 0, 1)
    else:
        assert (found, stats.deaf_found, stats.behind) == ([[FACTION]], 1, 0)


async def test_a_faction_that_hears_during_the_grace_is_not_deaf(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    async with live(upstream) as (watch, reconciler, found):
        upstream.keys.append(3)
        await trio.sleep(INTERVAL_S - 1.0 + GRACE_S / 2)  # the round found a difference; in its grace...
        reconciler.note_live_change("war_calls", {"eventType": "INSERT", "new": {"id": 3}, "old": {}})
        await trio.sleep(GRACE_S)
        stats = watch.statistics()
    assert (found, stats.deaf_found) == ([], 0)
    assert reconciler.heard_of("war_calls") == (3, 3)


@pytest.mark.parametrize("missed", [False, True])
async def test_a_check_reads_the_whole_table_only_when_a_probe_differs(
    autojump_clock: trio.testing.MockClock, missed: bool
) -> None:
    """A cold start's window or the shared DELETE socket's gap may have lost an INSERT or DELETE:
    one probe per table tells, and a faction that lost nothing is not read whole."""
    upstream = Upstream()
    async with live(upstream) as (watch, reconciler, found):
        before = reconciler.statistics()
        if missed:
            upstream.keys.remove(1)  # a DELETE the shared socket never carried
        reconciler.request("a check", check_first=True)
        await trio.sleep(1.0)
        after, stats = reconciler.statistics(), watch.statistics()
    assert (stats.checks, stats.checks_differed) == (1, int(missed))
    assert after.reconciles - before.reconciles == int(missed)
    assert after.rest_requests - before.rest_requests == int(missed)  # the snapshot: one page
    assert (found, after.due) == ([], False)
    if missed:
        assert reconciler.heard_of("war_calls") == (1, 2)


async def test_a_request_that_a_probe_cannot_settle_always_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    async with live(upstream) as (watch, reconciler, _):
        reconciler.request("a check", check_first=True)
        reconciler.request('"Subscribed to PostgreSQL" again')  # an UPDATE may be lost: no probe sees it
        await trio.sleep(1.0)
        reconciles = reconciler.statistics().reconciles
    assert (reconciles, watch.statistics().checks) == (2, 0)
