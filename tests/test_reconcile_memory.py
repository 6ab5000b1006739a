"""Reconciles hold a faction's whole table in memory while they compare it: after a restart every
faction reconciles at once, so the relay reads and compares only `SNAPSHOTS_AT_ONCE` at a time."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

import pytest
import trio
import trio.testing

from relay.config import ChannelConfig
from relay.upstream.reconcile import SNAPSHOTS_AT_ONCE, Reconciler, Reconciling
from relay.upstream.snapshot import Snapshot

pytestmark = pytest.mark.virtual_time

CHANNELS = [
    ChannelConfig("war_calls", "faction_id=eq.{faction_id}", "id"),
    ChannelConfig("wars", "faction_id=eq.{faction_id}", "id"),
]


class Upstream:
    """A REST read that takes a second, and a store that takes a second to compare, counting how many
    snapshots are held (read, or being compared) at once."""

    def __init__(self) -> None:
        self.held = 0
        self.most_held = 0
        self.compared: list[tuple[int, str]] = []

    async def read(self, table: str, filter: str, key: str) -> Snapshot:
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        await trio.sleep(1)
        return Snapshot([{"id": 1, "filter": filter}], 1)

    async def reconciled(
        self, faction_id: int, table: str, rows: list[dict[str, Any]], skip: AbstractSet[Any], read_at: str
    ) -> int:
        await trio.sleep(1)
        self.compared.append((faction_id, table))
        self.held -= 1
        return 0

    def watch_live_changes(self, faction_id: int, watcher: Reconciler) -> None:
        pass


async def test_150_factions_reconciling_at_once_hold_two_snapshots_at_most(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream()
    reconciling = Reconciling(
        CHANNELS,
        upstream.read,
        upstream,
        interval_s=300,
        backoff_initial_s=1,
        backoff_max_s=60,
        wall_clock_ms=lambda: 1_732_460_000_000,
    )
    async with trio.open_nursery() as nursery:
        for faction_id in range(1, 151):
            nursery.start_soon(reconciling.for_faction(faction_id).reconcile_once)
    assert upstream.most_held == SNAPSHOTS_AT_ONCE == 2
    assert len(upstream.compared) == 150 * len(CHANNELS)  # every faction got its turn
    # Two at a time, two seconds each: the whole restart's reconciles in 300 s of (virtual) time.
    assert trio.current_time() == pytest.approx(150 * len(CHANNELS) * 2 / SNAPSHOTS_AT_ONCE)
