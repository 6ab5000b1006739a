"""Which events each faction keeps, which of those are held in memory, and where the rest went.

A faction keeps its newest events: `events_per_faction` of them and at most `bytes_per_faction` (the
newest always). That window is what the database holds after the maintenance trim, and what a poll can
still get; a cursor older than it is answered `truncated`. The newest of the window are also held in
memory, up to `memory_bytes_per_faction` per faction and `memory_bytes` for all: what answers a member
who keeps up, without the database. The older part of the window is read from the database by the
store; the memory part is always the newest (a suffix of the window), so one read covers the rest.

Why bounded in bytes and not only in count: anyone with the anon key can publish bodies of
`publish.max_body_bytes`, and upstream rows reach a megabyte; 150 factions x 100 events of 256 KB
held twice took 7.7 GB. Each event's data is held once, inside the text it is served as.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from relay.config import RetentionConfig
from relay.storage.quarantine import QuarantineCounts, Unreadable, decode_text, log_quarantined, parse_json

# What Python spends on one event held in memory beyond its text: the event and its window slot
# (slotted objects of 6 and 3 fields), the str header, and the global order's reference (measured
# with sys.getsizeof on CPython 3.11: 88 + 72 + 49 + 8, rounded up).
EVENT_OVERHEAD_BYTES = 256
# `{"id":…,"type":…,"timestamp":…,"data":…}` around an event's type and data, with 10-digit ids.
_ENVELOPE_BYTES = 60
# Hot events read back at start-up in batches of this many ids (SQLite's default variable limit is 999).
_LOAD_BATCH = 500


def event_size(type_bytes: int, data_bytes: int) -> int:
    """An event's size as every limit counts it: its JSON as served, and what holding it costs."""
    return type_bytes + data_bytes + _ENVELOPE_BYTES + EVENT_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    faction_id: int
    timestamp: int
    type: str
    # The whole event as served, built once so that a poll only joins strings. Its data is the text
    # from `data_at` to the closing brace: held once, not beside it as well.
    json: str
    data_at: int

    @classmethod
    def build(cls, id: int, faction_id: int, timestamp: int, type: str, data_json: str) -> StoredEvent:
        head = f'{{"id":{id},"type":{json.dumps(type)},"timestamp":{timestamp},"data":'
        return cls(id, faction_id, timestamp, type, f"{head}{data_json}}}", len(head))

    @property
    def data_json(self) -> str:
        """The event's data, JSON text exactly as stored."""
        return self.json[self.data_at : -1]

    @property
    def size(self) -> int:
        return event_size(len(self.type), len(self.json) - self.data_at - 1)

    def data(self) -> Any:
        return json.loads(self.data_json)


@dataclass(eq=False, slots=True)
class _Kept:
    """One event of a faction's window: its stamp and size, and the event while it is in memory."""

    timestamp: int
    size: int
    event: StoredEvent | None  # None: in the database only


@dataclass(frozen=True, slots=True)
class Read:
    """An answer's events after a cursor: `from_database` of them (the oldest), stamped above
    `database_after` and at most `database_through`, to be read from the database, then `in_memory`."""

    database_after: int
    database_through: int
    from_database: int
    in_memory: list[StoredEvent]

    @property
    def newest(self) -> int | None:
        if self.in_memory:
            return self.in_memory[-1].timestamp
        return self.database_through if self.from_database else None


class _Window:
    """One faction's kept events, oldest first; those held in memory are the newest `len - cold`."""

    __slots__ = ("bytes", "cold", "kept", "memory_bytes")

    def __init__(self) -> None:
        self.kept: deque[_Kept] = deque()
        self.bytes = 0  # of every kept event
        self.cold = 0  # the oldest this many are in the database only
        self.memory_bytes = 0  # of those held in memory

    def oldest_in_memory(self) -> _Kept:
        return self.kept[self.cold]


class RetainedEvents:
    def __init__(self, limits: RetentionConfig, dropped_up_to: dict[int, int]) -> None:
        self._limits = limits
        self._windows: dict[int, _Window] = {}
        # Every event held in memory, in the order published (which is stamp order): the oldest leaves
        # first when all factions together hold too much. An entry whose event already left (its own
        # faction's limit, or its window) stays until it reaches the front, and is skipped there.
        self._memory_order: deque[_Kept] = deque()
        self._memory_bytes = 0
        # Per faction, the newest stamp no longer kept: a `since` below it has missed events, and the
        # trim deletes up to it.
        self._dropped_up_to = dropped_up_to
        # Per faction, the relay's cursor when changes of it were lost before they could be stored.
        self._lost_up_to: dict[int, int] = {}

    def __len__(self) -> int:
        """Events held in memory."""
        return sum(len(window.kept) - window.cold for window in self._windows.values())

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def kept_count(self, faction_id: int) -> int:
        window = self._windows.get(faction_id)
        return len(window.kept) if window else 0

    def publish(self, event: StoredEvent) -> None:
        """The faction's newest event, just committed: kept and held in memory, the oldest making way."""
        self._keep(event.faction_id, _Kept(event.timestamp, event.size, event))

    def _keep(self, faction_id: int, kept: _Kept) -> None:
        window = self._windows.get(faction_id)
        if window is None:
            window = self._windows[faction_id] = _Window()
        window.kept.append(kept)
        window.bytes += kept.size
        if kept.event is not None:
            window.memory_bytes += kept.size
            self._memory_bytes += kept.size
            self._memory_order.append(kept)
        else:
            window.cold += 1
        limits = self._limits
        while len(window.kept) > 1 and (
            len(window.kept) > limits.events_per_faction or window.bytes > limits.bytes_per_faction
        ):
            self._drop_oldest(faction_id, window)
        while window.memory_bytes > limits.memory_bytes_per_faction and window.cold < len(window.kept) - 1:
            self._to_database(window, window.oldest_in_memory())
        while self._memory_bytes > limits.memory_bytes and self._memory_order:
            oldest = self._memory_order.popleft()
            if oldest.event is not None:
                self._to_database(self._windows[oldest.event.faction_id], oldest)

    def _hold_loaded(self, chosen: Sequence[_Kept]) -> None:
        """At start: hold in memory the chosen events that were read back. Memory must stay the newest
        part of each window, so an event older than one that could not be read stays in the database."""
        for window in self._windows.values():
            held = 0
            for kept in reversed(window.kept):
                if kept.event is None:
                    break
                held += 1
            for kept in itertools.islice(window.kept, len(window.kept) - held):
                kept.event = None
            window.cold = len(window.kept) - held
            window.memory_bytes = sum(kept.size for kept in itertools.islice(window.kept, window.cold, None))
            self._memory_bytes += window.memory_bytes
        self._memory_order.extend(kept for kept in chosen if kept.event is not None)

    def _drop_oldest(self, faction_id: int, window: _Window) -> None:
        dropped = window.kept.popleft()
        window.bytes -= dropped.size
        if dropped.event is None:
            window.cold -= 1
        else:
            window.memory_bytes -= dropped.size
            self._memory_bytes -= dropped.size
            dropped.event = None
        self._dropped_up_to[faction_id] = dropped.timestamp

    def _to_database(self, window: _Window, kept: _Kept) -> None:
        """Let go of the faction's oldest event in memory: from now on it is read from the database."""
        assert kept is window.oldest_in_memory()
        kept.event = None
        window.cold += 1
        window.memory_bytes -= kept.size
        self._memory_bytes -= kept.size

    def read(self, faction_id: int, since: int | None, max_bytes: int) -> Read:
        """The kept events stamped after `since` (all when None), oldest first, as many as fit in
        `max_bytes` (at least one): the rest is for the next read, from the last one's stamp."""
        window = self._windows.get(faction_id)
        if window is None or not window.kept or (since is not None and window.kept[-1].timestamp <= since):
            return Read(0, 0, 0, [])  # most polls: a member up to date (a fresh list: callers own it)
        kept = window.kept
        start = len(kept)
        for kept_event in reversed(kept):  # a poll usually wants the last few, so walk from the end
            if since is not None and kept_event.timestamp <= since:
                break
            start -= 1
        end, size = start, 0
        while end < len(kept) and (end == start or size + kept[end].size <= max_bytes):
            size += kept[end].size
            end += 1
        cold_end = min(end, window.cold)
        from_database = max(0, cold_end - start)
        in_memory = [event for index in range(max(start, window.cold), end) if (event := kept[index].event)]
        return Read(
            # Not just `since`: the database holds dropped events until the next trim.
            database_after=max(-1 if since is None else since, self._dropped_up_to.get(faction_id, -1)),
            database_through=kept[cold_end - 1].timestamp if from_database else 0,
            from_database=from_database,
            in_memory=in_memory,
        )

    def newest_timestamp(self, faction_id: int) -> int | None:
        window = self._windows.get(faction_id)
        return window.kept[-1].timestamp if window and window.kept else None

    def missed_since(self, faction_id: int, since: int | None) -> bool:
        if since is None:
            return False
        return since < max(self._dropped_up_to.get(faction_id, 0), self._lost_up_to.get(faction_id, 0))

    def mark_lost(self, faction_id: int, cursor: int) -> None:
        """Changes of the faction were lost before they were stored: a member's cursor before `cursor`
        has not seen everything upstream did, and is answered `truncated`."""
        self._lost_up_to[faction_id] = max(self._lost_up_to.get(faction_id, 0), cursor)

    def dropped(self) -> dict[int, int]:
        """Per faction, the newest stamp no longer kept: what the trim deletes up to."""
        return dict(self._dropped_up_to)


def load_retained(
    conn: sqlite3.Connection, limits: RetentionConfig, quarantined: QuarantineCounts
) -> RetainedEvents:
    """The window of each faction in the database, as the store left it, and the newest of it in
    memory; an event in memory that cannot be read back is quarantined (`relay/storage/quarantine.py`).

    Sizes first, without the data, so that a database holding more than the limits (the trim runs
    only every few minutes) is never read whole into memory.
    """
    dropped_up_to: dict[int, int] = {}
    retained = RetainedEvents(limits, dropped_up_to)
    # Stamp order across factions: the memory order below is then the order events were published in.
    sizes = conn.execute(
        "SELECT id, faction_id, timestamp, length(CAST(type AS BLOB)), length(CAST(data AS BLOB)) FROM"
        " (SELECT id, faction_id, timestamp, type, data, row_number() OVER"
        " (PARTITION BY faction_id ORDER BY timestamp DESC) AS newest FROM events)"
        " WHERE newest <= ? ORDER BY timestamp",
        (limits.events_per_faction,),
    ).fetchall()
    by_stamp: dict[int, tuple[int, _Kept]] = {}
    for id, faction_id, timestamp, type_bytes, data_bytes in sizes:
        kept = _Kept(timestamp, event_size(type_bytes or 0, data_bytes or 0), None)
        retained._keep(faction_id, kept)
        by_stamp[timestamp] = (id, kept)
    # Events beyond the count the query returned are older than every kept one.
    for faction_id, newest_dropped in conn.execute(
        "SELECT faction_id, max(timestamp) FROM (SELECT faction_id, timestamp, row_number() OVER"
        " (PARTITION BY faction_id ORDER BY timestamp DESC) AS newest FROM events)"
        " WHERE newest > ? GROUP BY faction_id",
        (limits.events_per_faction,),
    ):
        dropped_up_to[faction_id] = max(dropped_up_to.get(faction_id, 0), newest_dropped)
    hot = _newest_that_fit(retained, limits)
    wanted = [by_stamp[kept.timestamp] for kept in hot]
    for event in _read_events(conn, [id for id, _ in wanted], quarantined, retained):
        _, kept = by_stamp[event.timestamp]
        kept.event = event
    retained._hold_loaded(hot)
    return retained


def _newest_that_fit(retained: RetainedEvents, limits: RetentionConfig) -> list[_Kept]:
    """The kept events to hold in memory, oldest first: from the newest down, each faction's until
    its limit, all of them until the total limit."""
    newest_first = sorted(
        ((kept, faction_id) for faction_id, window in retained._windows.items() for kept in window.kept),
        key=lambda pair: -pair[0].timestamp,
    )
    full: set[int] = set()
    per_faction: dict[int, int] = {}
    total = 0
    chosen: list[_Kept] = []
    for kept, faction_id in newest_first:
        if faction_id in full:
            continue
        held = per_faction.get(faction_id, 0)
        if (held and held + kept.size > limits.memory_bytes_per_faction) or (
            total + kept.size > limits.memory_bytes
        ):
            full.add(faction_id)  # older ones of this faction stay in the database: memory is a suffix
            continue
        per_faction[faction_id] = held + kept.size
        total += kept.size
        chosen.append(kept)
    chosen.reverse()
    return chosen


UnreadableEvent = tuple[
    int, int, int, Unreadable
]  # an event that cannot be read back: id, faction, stamp, why


def quarantine_events(
    unreadable: Iterable[UnreadableEvent], quarantined: QuarantineCounts, retained: RetainedEvents
) -> None:
    """Count and log each unreadable event, once however often it is read again, and mark it a gap:
    a member whose cursor is before it never sees it, so it is answered `truncated` (and reloads
    /state, which the next reconcile has made whole)."""
    for id, faction_id, timestamp, reason in unreadable:
        retained.mark_lost(faction_id, timestamp)
        if quarantined.note_event(id):
            log_quarantined("event", f"id={id}", faction_id, reason)


def _read_events(
    conn: sqlite3.Connection, ids: Sequence[int], quarantined: QuarantineCounts, retained: RetainedEvents
) -> Iterator[StoredEvent]:
    unreadable: list[UnreadableEvent] = []
    for start in range(0, len(ids), _LOAD_BATCH):
        batch = ids[start : start + _LOAD_BATCH]
        marks = ",".join("?" * len(batch))
        rows = conn.execute(
            "SELECT id, faction_id, timestamp, CAST(type AS BLOB), CAST(data AS BLOB) FROM events"
            f" WHERE id IN ({marks})",
            batch,
        )
        yield from readable_events(rows, unreadable)
    quarantine_events(unreadable, quarantined, retained)


def readable_events(
    rows: Iterable[tuple[int, int, int, bytes, bytes]], unreadable: list[UnreadableEvent]
) -> Iterator[StoredEvent]:
    """Events from rows read as BLOBs (sqlite3 would fail the whole read on one value that is not
    UTF-8); one that cannot be read back is skipped and added to `unreadable`."""
    for id, faction_id, timestamp, type, data in rows:
        try:
            yield StoredEvent.build(id, faction_id, timestamp, decode_text(type), _checked_json(data))
        except Unreadable as reason:
            unreadable.append((id, faction_id, timestamp, reason))


def _checked_json(raw: object) -> str:
    parse_json(raw)  # the served answer splices this text in: it must parse on its own
    return decode_text(raw)
