"""The events kept in memory, which answer every poll: each faction's newest, as served, and where the
part of its history that is no longer kept ends.

The store publishes an event here only after its commit returns, and loads the newest at start.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from dataclasses import dataclass
from typing import Any

from relay.storage.quarantine import QuarantineCounts, Unreadable, decode_text, log_quarantined, parse_json


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    faction_id: int
    timestamp: int
    type: str
    data_json: str  # the event's data, JSON text exactly as stored
    json: str  # the whole event as served, built once so that a poll only joins strings

    @classmethod
    def build(cls, id: int, faction_id: int, timestamp: int, type: str, data_json: str) -> StoredEvent:
        served = f'{{"id":{id},"type":{json.dumps(type)},"timestamp":{timestamp},"data":{data_json}}}'
        return cls(id, faction_id, timestamp, type, data_json, served)

    def data(self) -> Any:
        return json.loads(self.data_json)


class RetainedEvents:
    """The newest `per_faction` events of each faction, oldest first."""

    def __init__(self, per_faction: int, dropped_up_to: dict[int, int]) -> None:
        self._per_faction = per_faction
        self._events: dict[int, deque[StoredEvent]] = {}
        # Per faction, the newest stamp no longer retained: a `since` below it has missed events.
        self._dropped_up_to = dropped_up_to

    def __len__(self) -> int:
        return sum(len(retained) for retained in self._events.values())

    def publish(self, event: StoredEvent) -> None:
        retained = self._events.get(event.faction_id)
        if retained is None:
            retained = self._events[event.faction_id] = deque(maxlen=self._per_faction)
        if len(retained) == retained.maxlen:
            self._dropped_up_to[event.faction_id] = retained[0].timestamp
        retained.append(event)

    def since(self, faction_id: int, since: int | None) -> list[StoredEvent]:
        """Those stamped after `since` (all when None), oldest first."""
        retained = self._events.get(faction_id, ())
        found: list[StoredEvent] = []
        for event in reversed(retained):  # a poll usually wants the last few, so walk from the end
            if since is not None and event.timestamp <= since:
                break
            found.append(event)
        found.reverse()
        return found

    def newest_timestamp(self, faction_id: int) -> int | None:
        retained = self._events.get(faction_id)
        return retained[-1].timestamp if retained else None

    def mark_lost(self, faction_id: int, cursor: int) -> None:
        self._dropped_up_to[faction_id] = max(self._dropped_up_to.get(faction_id, 0), cursor)

    def missed_since(self, faction_id: int, since: int | None) -> bool:
        return since is not None and since < self._dropped_up_to.get(faction_id, 0)


def load_retained(
    conn: sqlite3.Connection, per_faction: int, quarantined: QuarantineCounts
) -> RetainedEvents:
    """The newest `per_faction` events of each faction in the database, as the store left them; an
    event that cannot be read back is quarantined (`relay/storage/quarantine.py`)."""
    dropped_up_to = dict(
        conn.execute(
            "SELECT faction_id, max(timestamp) FROM (SELECT faction_id, timestamp, row_number() OVER"
            " (PARTITION BY faction_id ORDER BY timestamp DESC) AS newest FROM events)"
            " WHERE newest > ? GROUP BY faction_id",
            (per_faction,),
        ).fetchall()
    )
    retained = RetainedEvents(per_faction, dropped_up_to)
    # As BLOBs: sqlite3 would fail the whole read on one value that is not UTF-8.
    for id, faction_id, timestamp, type, data in conn.execute(
        "SELECT id, faction_id, timestamp, CAST(type AS BLOB), CAST(data AS BLOB) FROM (SELECT *,"
        " row_number() OVER (PARTITION BY faction_id ORDER BY timestamp DESC) AS newest FROM events)"
        " WHERE newest <= ? ORDER BY timestamp",
        (per_faction,),
    ):
        try:
            event = StoredEvent.build(id, faction_id, timestamp, decode_text(type), _checked_json(data))
        except Unreadable as reason:
            quarantined.events += 1
            log_quarantined("event", f"id={id}", faction_id, reason)
            continue
        retained.publish(event)
    return retained


def _checked_json(raw: object) -> str:
    parse_json(raw)  # the served answer splices this text in: it must parse on its own
    return decode_text(raw)
