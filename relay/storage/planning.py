"""The batch planner: what one commit stores, decided without SQLite or Trio.

`plan_batch` turns a group commit's appends into the events to insert, what they do to the faction
rows, and the DELETEs to remember: each change sees the rows as the earlier changes of the batch left
them; a DELETE that arrives twice, or a change it overtook, is dropped; a change that leaves the rows
as they are is not served again. `plan_chunk` plans the next chunk of a reconcile's differences.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.storage.state import Lookup, Row, RowChange, RowKey, complete_change, row_key

# What Realtime calls the events its channels carry: each upstream change is stored with this type, and
# only an event of this type (of a tracked table) changes the faction rows.
CHANGE_TYPE = "postgres_changes"
# Tombstones: the commit time of each recent upstream DELETE, per faction, table and key. Two sockets
# (the faction's and the shared DELETE one) do not keep each other's order, so a DELETE may arrive
# twice, or before a change it followed upstream; both are recognised by commit time and dropped.
# Out-of-order arrivals are a second apart at most, so a few thousand recent ones are plenty.
TOMBSTONES_KEPT = 4_096

Place = tuple[int, str, RowKey]  # where a change lands: faction, table, key
Item = tuple[str, Any, str]  # an event to append: type, data, and the data as JSON


class UnstorableData(ValueError):
    """Data JSON cannot carry (NaN, Infinity) or nested too deeply to encode: refused unstamped."""


# allow_nan=False: browsers' JSON.parse refuses NaN, so such data is refused before it is stored. One
# encoder for all: json.dumps with options builds a new one per call, a quarter of its time.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(data: Any) -> str:
    try:
        return _ENCODER.encode(data)
    except ValueError as exc:
        raise UnstorableData(str(exc)) from None
    except RecursionError:
        raise UnstorableData("nested too deeply") from None


# Append and PlannedEvent are not frozen: one of each is made per appended event, and a frozen
# dataclass takes three times as long to make (its __init__ goes through object.__setattr__).
@dataclass(slots=True)
class Append:
    faction_id: int
    items: Sequence[Item]


@dataclass(slots=True)
class PlannedEvent:
    source: int  # the index of the append (in the batch) it comes from
    faction_id: int
    type: str
    data_json: str  # as it is to be stored and served: a key-only `old` completed


@dataclass(slots=True)
class Plan:
    events: list[PlannedEvent] = field(default_factory=list)
    row_changes: list[RowChange] = field(default_factory=list)
    tombstones: dict[Place, str] = field(default_factory=dict)  # DELETEs planned: place -> commit time
    # A reconcile's differences JSON cannot carry (a NaN upstream): faction, table and why; not stored.
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    # Upstream changes that leave the faction's rows possibly unlike upstream's (an error record, an
    # UPDATE lacking columns): faction, table and why. Each asks for a reconcile (`relay.ingest`).
    stale: list[tuple[int, str, str]] = field(default_factory=list)
    # (faction, table) whose first reconcile this plan completes: its rows are upstream's from now on.
    baselines: list[tuple[int, str]] = field(default_factory=list)


class Tombstones:
    """The commit times of the newest TOMBSTONES_KEPT upstream DELETEs committed, by place."""

    def __init__(self, kept: int = TOMBSTONES_KEPT) -> None:
        self._kept = kept
        self._deleted_at: OrderedDict[Place, str] = OrderedDict()

    def get(self, place: Place) -> str | None:
        return self._deleted_at.get(place)

    def remember(self, deleted_at: Mapping[Place, str]) -> None:
        """Called once the DELETEs are committed."""
        self._deleted_at.update(deleted_at)
        while len(self._deleted_at) > self._kept:
            self._deleted_at.popitem(last=False)


def plan_batch(
    batch: Sequence[Append], rows: Lookup, tombstones: Tombstones, key_columns: Mapping[str, str]
) -> Plan:
    """The events to insert, in order, and what they do to `rows`. Only a `CHANGE_TYPE` event of a
    table in `key_columns` is looked into; any other event is stored as it came."""
    planner = _BatchPlanner(rows, tombstones)
    for source, append in enumerate(batch):
        for kind, data, data_json in append.items:
            key_column = (
                key_columns.get(str(data.get("table")))
                if kind == CHANGE_TYPE and isinstance(data, Mapping)
                else None
            )
            served_json: str | None = data_json
            if key_column is not None:
                served_json = planner.change(append.faction_id, data, data_json, key_column)
            if served_json is not None:
                planner.plan.events.append(PlannedEvent(source, append.faction_id, kind, served_json))
    return planner.plan


def plan_chunk(
    faction_id: int,
    key_column: str,
    changes: Iterator[Mapping[str, Any]],
    rows: Lookup,
    *,
    max_events: int,
    max_bytes: int,
    baseline: bool = False,
) -> tuple[Plan, bool]:
    """The next chunk of a reconcile's differences, taken from `changes`, and whether it was the last:
    at most `max_events` differences and, unless one is larger, `max_bytes` of JSON. The differences
    are of disjoint keys, so each sees `rows` as they are. A difference JSON cannot carry is left out,
    rows and all, in `refused`: the next reconcile finds it again until upstream changes that row.

    A `baseline` changes the rows only, without events: the first read of a faction's table is what
    upstream holds, not what changed (see migrations/0004_faction_baselines.sql)."""
    plan = Plan()
    size = planned = 0
    for change in changes:
        completed = complete_change(faction_id, change, key_column, rows)
        served, effects = completed.served, completed.effects
        try:
            data_json = encode(served)
        except UnstorableData as exc:
            plan.refused.append((faction_id, str(change.get("table")), str(exc)))
            continue
        if not baseline:
            plan.events.append(PlannedEvent(0, faction_id, CHANGE_TYPE, data_json))
        plan.row_changes.extend(effects)
        planned += 1
        size += len(data_json)
        if planned >= max_events or size >= max_bytes:
            return plan, False
    return plan, True


class _BatchPlanner:
    """One batch's plan so far, and the rows as its changes so far leave them."""

    def __init__(self, rows: Lookup, tombstones: Tombstones) -> None:
        self.plan = Plan()
        self._rows, self._tombstones = rows, tombstones
        self._overlay: dict[Place, Row | None] = {}

    def lookup(self, faction_id: int, table: str, key: RowKey) -> Row | None:
        place = (faction_id, table, key)
        return self._overlay[place] if place in self._overlay else self._rows(faction_id, table, key)

    def change(
        self, faction_id: int, change: Mapping[str, Any], data_json: str, key_column: str
    ) -> str | None:
        """Plan one change of a tracked table; its JSON as served, or None when it is not stored."""
        arrival = _ordering(faction_id, change, key_column)
        if arrival is not None:
            place, committed_at = arrival
            deleted_at = self.plan.tombstones.get(place) or self._tombstones.get(place)
            if deleted_at is not None and committed_at <= deleted_at:
                # This DELETE again (by a second channel), or a change it overtook.
                return None
            if change.get("eventType") == "DELETE":
                self.plan.tombstones[place] = committed_at
        completed = complete_change(faction_id, change, key_column, self.lookup)
        served, effects = completed.served, completed.effects
        if completed.stale is not None:
            self.plan.stale.append((faction_id, str(change.get("table")), completed.stale))
        if _changes_nothing(effects, self.lookup):
            # A row the faction holds already, as it is (a snapshot read just before brought it):
            # whoever follows the events has it, so it is not served twice.
            return None
        for effect in effects:
            self._overlay[(effect.faction_id, effect.table, effect.key)] = effect.row
        self.plan.row_changes.extend(effects)
        return data_json if served == change else encode(served)


def _ordering(faction_id: int, change: Mapping[str, Any], key_column: str) -> tuple[Place, str] | None:
    """Where an upstream change lands and when it committed; None for a change that cannot be placed
    (no key, no commit time) and for the relay's own resync changes."""
    stamp, kind = change.get("commit_timestamp"), change.get("eventType")
    row = change.get("old") if kind == "DELETE" else change.get("new")
    if (
        change.get("resync")
        or not isinstance(stamp, str)
        or not isinstance(row, Mapping)
        or key_column not in row
    ):
        return None
    # Realtime's commit_timestamp is fixed-width ISO 8601 UTC, so text order is time order.
    return (faction_id, str(change.get("table")), row_key(row[key_column])), stamp


def _changes_nothing(effects: Sequence[RowChange], lookup: Lookup) -> bool:
    return bool(effects) and all(
        change.row is not None and lookup(change.faction_id, change.table, change.key) == change.row
        for change in effects
    )
