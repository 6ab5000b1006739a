"""The batch planner as pure functions, no SQLite and no Trio: each case plans one batch of appends
against the rows held and the DELETEs already committed, and states what is served, what it does to
the rows and which DELETEs it adds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from relay.storage.planning import (
    CHANGE_TYPE,
    Append,
    Plan,
    Tombstones,
    UnstorableData,
    encode,
    plan_batch,
    plan_chunk,
)
from relay.storage.state import Row, diff, row_key
from tests.helpers.faction_rows import FactionRows

pytestmark = pytest.mark.unit

F, G = 46666, 11581
KEYS = {"war_calls": "id"}
T1, T2, T3, T4 = (f"2026-11-24T21:00:0{second}.000Z" for second in range(1, 5))

Item = tuple[str, Any]  # (type, data), as appended


def change(
    kind: str, *, new: Row | None = None, old: Row | None = None, at: str | None = T2, **extra: Any
) -> Item:
    data = {
        "table": "war_calls",
        "eventType": kind,
        "new": new or {},
        "old": old or {},
        "commit_timestamp": at,
    }
    return CHANGE_TYPE, {**data, **extra}


def completed(item: Item, old: Row) -> Item:
    """The item as served: its key-only `old` filled in from the stored row."""
    return item[0], {**item[1], "old": old}


ROW = {"id": 7, "faction_id": F, "target_id": 3001}
MOVED = {**ROW, "target_id": 9}
INSERT = change("INSERT", new=ROW, at=T1)
UPDATE = change("UPDATE", new=MOVED, old={"id": 7}, at=T2)
DELETE = change("DELETE", old={"id": 7}, at=T3)
INSERT_AGAIN = change("INSERT", new=ROW, at=T4)
RENUMBER = change("UPDATE", new={**ROW, "id": 8}, old={"id": 7})
RESYNC = change("INSERT", new=ROW, at=T1, resync=True)
FULL_DELETE = change("DELETE", old={**ROW, "extra": 1}, at=T3)  # REPLICA IDENTITY FULL
KEYLESS = change("INSERT", new={"target_id": 3001})
OTHER_TABLE = (CHANGE_TYPE, {**INSERT[1], "table": "wars"})
# What the WAL leaves out (reference audit 9-11): a long value the UPDATE did not change, under DEFAULT
# identity; every value over 64 bytes, in an `Error 413` record; the whole row, in an `Error 400`/`401`.
LONG = {**ROW, "note": "x" * 3000}
TOAST_UPDATE = change("UPDATE", new={"id": 7, "faction_id": F, "target_id": 9}, old={"id": 7})
TOO_LARGE = ["Error 413: Payload Too Large"]
TRUNCATED_UPDATE = change("UPDATE", new={"id": 7, "target_id": 9}, old={"id": 7}, errors=TOO_LARGE)
TRUNCATED_INSERT = change("INSERT", new={"id": 7, "target_id": 9}, errors=TOO_LARGE)
TRUNCATED_DELETE = change("DELETE", old={"id": 7, "target_id": 3001}, at=T3, errors=TOO_LARGE)
NO_KEY_RECORD = change("INSERT", at=None, errors=["Error 401: Unauthorized"])
RESYNC_WITHOUT_NOTE = change("UPDATE", new=MOVED, old=LONG, resync=True)
NOT_A_CHANGE = ("hospital_update", {"id": 7, "members": []})


@dataclass(frozen=True)
class Case:
    batch: list[tuple[int, list[Item]]]  # the appends: faction, items
    served: list[tuple[int, int, Item]]  # the events planned: the append they come from, faction, item
    row_changes: list[tuple[int, object, Row | None]] = field(default_factory=list)  # faction, key, row
    held: list[tuple[int, Row]] = field(default_factory=list)  # rows stored before: faction, row
    deleted: dict[tuple[int, object], str] = field(default_factory=dict)  # DELETEs committed before
    tombstones: dict[tuple[int, object], str] = field(default_factory=dict)  # DELETEs the batch adds
    stale: list[str] = field(default_factory=list)  # how each reason to reconcile begins


CASES = {
    "an insert is served as it came and adds the row": Case(
        batch=[(F, [INSERT])], served=[(0, F, INSERT)], row_changes=[(F, 7, ROW)]
    ),
    "an update's key-only old is completed from the stored row": Case(
        held=[(F, ROW)],
        batch=[(F, [UPDATE])],
        served=[(0, F, completed(UPDATE, ROW))],
        row_changes=[(F, 7, MOVED)],
    ),
    "a delete is completed, removes the row and is remembered": Case(
        held=[(F, ROW)],
        batch=[(F, [DELETE])],
        served=[(0, F, completed(DELETE, ROW))],
        row_changes=[(F, 7, None)],
        tombstones={(F, 7): T3},
    ),
    "each change sees the rows as the earlier changes of the batch left them": Case(
        batch=[(F, [INSERT]), (F, [UPDATE, DELETE])],
        served=[(0, F, INSERT), (1, F, completed(UPDATE, ROW)), (1, F, completed(DELETE, MOVED))],
        row_changes=[(F, 7, ROW), (F, 7, MOVED), (F, 7, None)],
        tombstones={(F, 7): T3},
    ),
    "an update to another key moves the row": Case(
        held=[(F, ROW)],
        batch=[(F, [RENUMBER])],
        served=[(0, F, completed(RENUMBER, ROW))],
        row_changes=[(F, 7, None), (F, 8, {**ROW, "id": 8})],
    ),
    "an insert of a row held as it is is not served again": Case(
        held=[(F, ROW)], batch=[(F, [INSERT])], served=[]
    ),
    "an update that leaves the row as it is is not served": Case(
        held=[(F, MOVED)], batch=[(F, [UPDATE])], served=[]
    ),
    "the same delete twice in one batch is stored once": Case(
        held=[(F, ROW)],
        batch=[(F, [DELETE]), (F, [DELETE])],
        served=[(0, F, completed(DELETE, ROW))],
        row_changes=[(F, 7, None)],
        tombstones={(F, 7): T3},
    ),
    "a delete committed already is dropped": Case(deleted={(F, 7): T3}, batch=[(F, [DELETE])], served=[]),
    "a change that the delete overtook is dropped": Case(
        deleted={(F, 7): T3}, batch=[(F, [UPDATE])], served=[]
    ),
    "a change committed after the delete stands": Case(
        deleted={(F, 7): T3},
        batch=[(F, [INSERT_AGAIN])],
        served=[(0, F, INSERT_AGAIN)],
        row_changes=[(F, 7, ROW)],
    ),
    "a delete is remembered per faction": Case(
        held=[(F, ROW)],
        deleted={(G, 7): T3},
        batch=[(F, [DELETE])],
        served=[(0, F, completed(DELETE, ROW))],
        row_changes=[(F, 7, None)],
        tombstones={(F, 7): T3},
    ),
    "the relay's own resync changes are not ordered by commit time": Case(
        deleted={(F, 7): T3}, batch=[(F, [RESYNC])], served=[(0, F, RESYNC)], row_changes=[(F, 7, ROW)]
    ),
    "a full old record is served as it came": Case(
        held=[(F, ROW)],
        batch=[(F, [FULL_DELETE])],
        served=[(0, F, FULL_DELETE)],
        row_changes=[(F, 7, None)],
        tombstones={(F, 7): T3},
    ),
    "a change without its key is served as it came and changes nothing": Case(
        batch=[(F, [KEYLESS])], served=[(0, F, KEYLESS)]
    ),
    "an update without an unchanged long value is completed from the stored row, and reconciled": Case(
        held=[(F, LONG)],
        batch=[(F, [TOAST_UPDATE])],
        served=[(0, F, (CHANGE_TYPE, {**TOAST_UPDATE[1], "new": {**LONG, "target_id": 9}, "old": LONG}))],
        row_changes=[(F, 7, {**LONG, "target_id": 9})],
        stale=["UPDATE without note"],
    ),
    "an update with a column the stored row lacks is not stale": Case(
        held=[(F, ROW)],
        batch=[(F, [change("UPDATE", new=LONG, old={"id": 7})])],
        served=[(0, F, completed(change("UPDATE", new=LONG, old={"id": 7}), ROW))],
        row_changes=[(F, 7, LONG)],
    ),
    "a resync update never counts as missing columns": Case(
        held=[(F, LONG)],
        batch=[(F, [RESYNC_WITHOUT_NOTE])],
        served=[(0, F, RESYNC_WITHOUT_NOTE)],
        row_changes=[(F, 7, MOVED)],
    ),
    "a 413 update is served as it came, leaves the row alone and is reconciled": Case(
        held=[(F, LONG)],
        batch=[(F, [TRUNCATED_UPDATE])],
        served=[(0, F, TRUNCATED_UPDATE)],
        stale=["error record (UPDATE"],
    ),
    "a 413 insert adds no row and is reconciled": Case(
        batch=[(F, [TRUNCATED_INSERT])], served=[(0, F, TRUNCATED_INSERT)], stale=["error record (INSERT"]
    ),
    "a 413 delete still deletes, its old completed from the stored row": Case(
        held=[(F, LONG)],
        batch=[(F, [TRUNCATED_DELETE])],
        served=[(0, F, completed(TRUNCATED_DELETE, LONG))],
        row_changes=[(F, 7, None)],
        tombstones={(F, 7): T3},
    ),
    "a record without a row (400, 401) is served as it came and reconciled": Case(
        held=[(F, ROW)],
        batch=[(F, [NO_KEY_RECORD])],
        served=[(0, F, NO_KEY_RECORD)],
        stale=["error record (INSERT"],
    ),
    "other event types and untracked tables are stored as they came": Case(
        held=[(F, ROW)],
        batch=[(F, [NOT_A_CHANGE]), (G, [OTHER_TABLE])],
        served=[(0, F, NOT_A_CHANGE), (1, G, OTHER_TABLE)],
    ),
}


def places(by_key: dict[tuple[int, object], str]) -> dict[tuple[int, str, str], str]:
    return {(faction_id, "war_calls", row_key(key)): at for (faction_id, key), at in by_key.items()}


def plan(case: Case) -> Plan:
    rows = FactionRows((faction_id, "war_calls", row_key(row["id"]), row) for faction_id, row in case.held)
    tombstones = Tombstones()
    tombstones.remember(places(case.deleted))
    batch = [
        Append(faction_id, [(kind, data, encode(data)) for kind, data in items])
        for faction_id, items in case.batch
    ]
    return plan_batch(batch, rows.get, tombstones, KEYS)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan_batch(case: Case) -> None:
    planned = plan(case)
    served = [
        (event.source, event.faction_id, (event.type, json.loads(event.data_json)))
        for event in planned.events
    ]
    assert served == case.served
    assert [(c.faction_id, c.table, c.key, c.row) for c in planned.row_changes] == [
        (faction_id, "war_calls", row_key(key), row) for faction_id, key, row in case.row_changes
    ]
    assert planned.tombstones == places(case.tombstones)
    assert len(planned.stale) == len(case.stale)
    for (faction_id, table, reason), begins in zip(planned.stale, case.stale, strict=True):
        assert (faction_id, table) == (F, "war_calls")
        assert reason.startswith(begins)


def test_an_event_served_as_it_came_keeps_the_json_it_came_with() -> None:
    data = {**INSERT[1], "note": "key order kept"}
    appended = json.dumps(data, separators=(",", ":"))
    planned = plan_batch([Append(F, [(CHANGE_TYPE, data, appended)])], FactionRows().get, Tombstones(), KEYS)
    assert [event.data_json for event in planned.events] == [appended]


@pytest.mark.parametrize(
    ("max_events", "max_bytes", "chunks"),
    [
        (10, 1 << 20, [5]),
        (2, 1 << 20, [2, 2, 1]),
        (5, 1 << 20, [5, 0]),  # a full chunk is not known to be the last
        (10, 1, [1, 1, 1, 1, 1, 0]),  # an event larger than max_bytes goes alone
    ],
)
def test_plan_chunk_takes_a_reconcile_a_chunk_at_a_time(
    max_events: int, max_bytes: int, chunks: list[int]
) -> None:
    rows = FactionRows([(F, "war_calls", row_key(1), {"id": 1, "v": "old"})])
    snapshot = {row_key(n): {"id": n, "v": "new"} for n in range(1, 6)}
    changes = diff("war_calls", rows.rows(F, "war_calls"), snapshot, commit_timestamp=T1)
    sizes: list[int] = []
    kinds: list[str] = []
    finished = False
    while not finished:
        planned, finished = plan_chunk(F, "id", changes, rows.get, max_events=max_events, max_bytes=max_bytes)
        sizes.append(len(planned.events))
        kinds += [json.loads(event.data_json)["eventType"] for event in planned.events]
        assert len(planned.row_changes) == len(planned.events)
        assert {(event.source, event.faction_id, event.type) for event in planned.events} <= {
            (0, F, CHANGE_TYPE)
        }
    assert sizes == chunks
    assert kinds == ["UPDATE", "INSERT", "INSERT", "INSERT", "INSERT"]


def test_tombstones_keep_the_newest_deletes() -> None:
    tombstones = Tombstones(kept=2)
    first, second, third = ((F, "war_calls", row_key(n)) for n in range(3))
    for place, at in ((first, T1), (second, T2), (third, T3)):
        tombstones.remember({place: at})
    assert [tombstones.get(place) for place in (first, second, third)] == [None, T2, T3]


def test_encode_is_compact_and_refuses_what_a_browser_cannot_parse() -> None:
    assert encode({"a": [1, 2.5]}) == '{"a":[1,2.5]}'
    with pytest.raises(UnstorableData, match="JSON"):
        encode({"a": float("nan")})
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UnstorableData, match="nested too deeply"):
        encode(deep)
