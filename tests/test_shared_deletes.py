"""The relay-wide DELETE subscription's router, in virtual time: route by key, park what outruns its row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from relay.storage.state import RowKey, row_key
from relay.upstream.phoenix import ChangeReceived
from relay.upstream.shared_deletes import PARK_S, DeleteRouter, RouterStatistics

pytestmark = pytest.mark.virtual_time

A, B = 46666, 11581


def change(kind: str, new: dict[str, Any], old: dict[str, Any]) -> ChangeReceived:
    return ChangeReceived("war_calls", {"table": "war_calls", "eventType": kind, "new": new, "old": old})


class Harness:
    def __init__(self) -> None:
        self.owners: dict[Any, int] = {}
        self.delivered: list[tuple[int, list[Any]]] = []
        self.router = DeleteRouter({"war_calls": "id"}, self.owner, self.deliver)

    async def owner(self, places: Sequence[tuple[str, RowKey]]) -> dict[tuple[str, RowKey], int]:
        keys = {row_key(key): faction_id for key, faction_id in self.owners.items()}
        return {(table, key): keys[key] for table, key in places if table == "war_calls" and key in keys}

    async def deliver(self, faction_id: int, changes: Sequence[ChangeReceived]) -> None:
        self.delivered.append((faction_id, [c.data["old"]["id"] for c in changes]))


async def test_deletes_go_to_the_faction_holding_the_row(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    harness.owners.update({1: A, 2: B, 3: A})
    await harness.router.route([change("DELETE", {}, {"id": n}) for n in (1, 2, 3)])
    assert sorted(harness.delivered) == [(B, [2]), (A, [1, 3])]


async def test_a_delete_that_outruns_its_insert_follows_it(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    await harness.router.route([change("DELETE", {}, {"id": 7}), change("DELETE", {}, {"id": 8})])
    assert harness.delivered == []
    await trio.sleep(PARK_S / 2)
    await harness.router.stored(A, [change("INSERT", {"id": 7}, {})])
    assert harness.delivered == [(A, [7])]
    await trio.sleep(PARK_S)
    await harness.router.route([])  # expiry happens as the router works
    await harness.router.stored(A, [change("INSERT", {"id": 8}, {})])
    assert harness.delivered == [(A, [7])]  # too late: 8 was dropped (the reconcile is the backstop)
    assert harness.router.statistics() == RouterStatistics(routed=1, parked=0, dropped=1)
