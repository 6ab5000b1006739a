"""Faction state: each faction's current rows per table, as the change events leave them.

Pure data and functions, no I/O: the store keeps the rows in the database only (`faction_rows`: a
row can be a megabyte, and a faction can hold thousands), reads them through a `Lookup` while it plans
a commit in its write thread, and writes what changes in the same transaction as the events that
change it.

Why it exists: with Postgres's default replica identity an UPDATE's or DELETE's `old` carries only
the primary key, while today's userscript recognises an uncall by `old.target_id`; and Realtime
never replays what it did not deliver, so the relay compares its rows with a snapshot (`diff`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]
# The key column's value as JSON text: 7 and "7" are different keys, as they are in Postgres.
RowKey = str


_KEY_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def row_key(value: Any) -> RowKey:
    if type(value) is int:  # nearly every key; JSON writes an int as Python does (a bool is not one)
        return str(value)
    return _KEY_ENCODER.encode(value)


@dataclass(frozen=True, slots=True)
class RowChange:
    """What one event does to the stored rows: `row` is the new row, None when it is gone."""

    faction_id: int
    table: str
    key: RowKey
    row: Row | None


Lookup = Callable[[int, str, RowKey], Row | None]


def complete_change(
    faction_id: int, change: Mapping[str, Any], key_column: str, lookup: Lookup
) -> tuple[dict[str, Any], list[RowChange]]:
    """The change as it should be served, its key-only `old` filled in from the stored row, and what
    it does to the faction's rows. A change whose row has no key value is served as it came and
    changes nothing (a table without that key column cannot be tracked)."""
    served = dict(change)
    table, kind = str(change.get("table")), change.get("eventType")
    new, old = change.get("new") or {}, change.get("old") or {}
    if kind == "INSERT":
        if key_column not in new:
            return served, []
        return served, [RowChange(faction_id, table, row_key(new[key_column]), dict(new))]
    identity = old if key_column in old else new
    if key_column not in identity:
        return served, []
    old_key = row_key(identity[key_column])
    previous = lookup(faction_id, table, old_key)
    if previous is not None and set(old) <= {key_column}:
        served["old"] = dict(previous)
    if kind == "DELETE":
        return served, [RowChange(faction_id, table, old_key, None)]
    if key_column not in new:
        return served, []
    new_key = row_key(new[key_column])
    moves = [RowChange(faction_id, table, old_key, None)] if new_key != old_key else []
    return served, [*moves, RowChange(faction_id, table, new_key, dict(new))]


def diff(
    table: str,
    current: Mapping[RowKey, Row],
    snapshot: Mapping[RowKey, Row],
    *,
    skip: frozenset[RowKey] = frozenset(),
    commit_timestamp: str,
) -> Iterator[dict[str, Any]]:
    """The changes, in the realtime-js shape and marked `resync`, that turn `current` into `snapshot`.

    Keys in `skip` changed live while the snapshot was read; the live change is at least as new as the
    snapshot, so they are left as they are. Ordered by key so that the outcome is reproducible, and
    made one at a time, so that a large snapshot can be stored a chunk at a time.
    """

    def change(kind: str, new: Row, old: Row) -> dict[str, Any]:
        return {
            "schema": "public",
            "table": table,
            "commit_timestamp": commit_timestamp,
            "eventType": kind,
            "new": new,
            "old": old,
            "errors": None,
            "resync": True,
        }

    for key in sorted((set(current) | set(snapshot)) - skip):
        before, after = current.get(key), snapshot.get(key)
        if before is None and after is not None:
            yield change("INSERT", dict(after), {})
        elif before is not None and after is None:
            yield change("DELETE", {}, dict(before))
        elif before is not None and after is not None and before != after:
            yield change("UPDATE", dict(after), dict(before))
