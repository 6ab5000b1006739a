"""The reconcile's race with live changes, on the real store: a change upstream committed after the
snapshot was read, but delivered on the socket only after the read returned, must not be undone by
the reconcile's differences.

This was the flaky `test_state.py` failure (a row deleted upstream came back as a resync INSERT):
live keys were noted only while the REST read was in flight, and the store compared the snapshot
with rows the late DELETE had already changed. The seam is the reconciler's injected `apply`: the
late change is delivered and stored between the read returning and the differences being stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from relay.config import ChannelConfig
from relay.storage.store import Store, open_store
from relay.upstream.backoff import Backoff
from relay.upstream.reconcile import Reconciler
from relay.upstream.snapshot import Snapshot
from tests.helpers.factions import FACTION

pytestmark = pytest.mark.unit

CHANNEL = ChannelConfig("war_calls", "faction_id=eq.{faction_id}")
KEYS = {"war_calls": "id"}


def change(kind: str, new: dict[str, Any], old: dict[str, Any], at: str) -> dict[str, Any]:
    return {
        "schema": "public",
        "table": "war_calls",
        "commit_timestamp": at,
        "eventType": kind,
        "new": new,
        "old": old,
        "errors": None,
    }


async def stored_ids(store: Store) -> list[int]:
    return [row["id"] for row in (await store.faction_state(FACTION)).tables["war_calls"]]


@pytest.mark.parametrize("late", ["DELETE", "UPDATE"])
async def test_a_change_delivered_after_the_read_returned_is_not_undone_by_the_reconcile(
    tmp_path: Path, late: str
) -> None:
    row = {"id": 1, "faction_id": FACTION, "target_id": 3001}
    updated = {**row, "target_id": 3002}
    late_change = (
        change("DELETE", {}, {"id": 1}, "2026-11-24T20:00:02.000Z")
        if late == "DELETE"
        else change("UPDATE", updated, {"id": 1}, "2026-11-24T20:00:02.000Z")
    )
    with trio.fail_after(10):
        async with open_store(tmp_path / "relay.db", key_columns=KEYS) as store:
            await store.append_events(
                FACTION, [("postgres_changes", change("INSERT", row, {}, "2026-11-24T20:00:01.000Z"))]
            )
            reconciler: Reconciler

            async def read(table: str, realtime_filter: str, key: str) -> Snapshot:
                return Snapshot(rows=[dict(row)], requests=1)  # read before the late change committed

            async def apply(
                faction_id: int, table: str, rows: list[dict[str, Any]], skip: Any, read_at: str
            ) -> int:
                # The late change reaches the socket now: told to the reconciler as it is read, stored.
                reconciler.note_live_change("war_calls", late_change)
                await store.append_events(FACTION, [("postgres_changes", late_change)])
                events = await store.reconcile(faction_id, table, rows, skip=skip, commit_timestamp=read_at)
                return len(events)

            reconciler = Reconciler(
                FACTION,
                [CHANNEL],
                read,
                apply,
                interval_s=300.0,
                backoff=Backoff(1.0, 60.0),
                wall_clock_ms=lambda: 1_732_478_403_000,
            )
            assert await reconciler.reconcile_once() == 0
            expected = [] if late == "DELETE" else [updated]
            assert (await store.faction_state(FACTION)).tables["war_calls"] == expected
