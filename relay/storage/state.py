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
# How a `Completed.stale` reason starts when upstream sent an error record: upstream's fault, not the WAL's.
ERROR_RECORD = "error record"


@dataclass(frozen=True, slots=True)
class Completed:
    """A change as it is to be served, what it does to the faction's rows, and why the rows may now
    differ from upstream's (`stale`, None when they should not): a reconcile is then asked for."""

    served: dict[str, Any]
    effects: list[RowChange]
    stale: str | None = None


def complete_change(faction_id: int, change: Mapping[str, Any], key_column: str, lookup: Lookup) -> Completed:
    """The change as it should be served, what the WAL left out of its rows filled in from the stored
    row, and what it does to the faction's rows. A change whose row has no key value is served as it
    came and changes nothing (a table without that key column cannot be tracked).

    What the WAL leaves out, and what is done about it:
    - `old` under DEFAULT identity, and a DELETE's `old` under RLS even with FULL, carry only the key:
      the rest is the stored row, which today's script needs (`old.target_id` of an uncall).
    - An UPDATE under DEFAULT identity leaves out each unchanged TOASTed value (over about 2 kB): the
      columns the stored row has and `new` lacks are taken from it, so neither members nor the stored
      row ever hold a partial row. The relay cannot tell that from a column dropped upstream, so it is
      `stale` too, and the reconcile asked for settles it.
    - An error record (`errors`: `Error 413` keeps only values of at most 64 bytes, whether changed or
      not; `Error 400`/`401` carry no row) is served as realtime-js hands it over, but its `new` never
      replaces a stored row: it is `stale`, and the reconcile brings the row whole. A DELETE's key
      is whole even in a 413 record, so it still deletes.
    """
    served = dict(change)
    table, kind = str(change.get("table")), change.get("eventType")
    new, old = change.get("new") or {}, change.get("old") or {}
    errors = change.get("errors")
    if errors and kind != "DELETE":
        return Completed(served, [], f"{ERROR_RECORD} ({kind}, errors {errors!r})")
    if kind == "INSERT":
        if key_column not in new:
            return Completed(served, [])
        return Completed(served, [RowChange(faction_id, table, row_key(new[key_column]), dict(new))])
    identity = old if key_column in old else new
    if key_column not in identity:
        return Completed(served, [])
    old_key = row_key(identity[key_column])
    previous = lookup(faction_id, table, old_key)
    if previous is not None and not set(previous) <= set(old):
        served["old"] = _filled(old, previous)
    if kind == "DELETE":
        return Completed(served, [RowChange(faction_id, table, old_key, None)])
    if key_column not in new:
        return Completed(served, [])
    stale = None
    if previous is not None and not change.get("resync") and not set(previous) <= set(new):
        missing = sorted(set(previous) - set(new))
        stale = f"UPDATE without {', '.join(missing)} (unchanged TOAST values, or columns dropped upstream)"
        new = served["new"] = _filled(new, previous)
    new_key = row_key(new[key_column])
    moves = [RowChange(faction_id, table, old_key, None)] if new_key != old_key else []
    return Completed(served, [*moves, RowChange(faction_id, table, new_key, dict(new))], stale)


def _filled(partial: Mapping[str, Any], stored: Row) -> Row:
    """`partial`, with the columns it lacks taken from `stored`, in the stored row's column order."""
    filled = {name: partial.get(name, value) for name, value in stored.items()}
    filled.update(partial)
    return filled


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
