"""Stored data that cannot be read back: an event or a faction row whose bytes are not UTF-8 or whose
text is not strict JSON (an operator's `sqlite3`, a disk fault, a bad restore).

Such a row is skipped, never served and never fatal: one WARNING names its id and faction (never its
content, which may be large or a member's data), and a counter goes to `/metrics`. The row stays in the
database for the operator to look at; retention trims a quarantined event like any other, and a
quarantined faction row is taken as missing, so the next reconcile stores the upstream row over it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class Unreadable(ValueError):
    """A stored value that is not UTF-8 or not strict JSON."""


@dataclass(slots=True)
class QuarantineCounts:
    """What was quarantined, each counted and logged once however often it is read again (an event
    older than what memory holds is read from the database by every poll that wants it)."""

    events: int = 0
    faction_rows: int = 0
    _seen_events: set[int] = field(default_factory=set)
    _seen_rows: set[tuple[int, str, str]] = field(default_factory=set)

    def note_event(self, id: int) -> bool:
        """Whether this is the first time the event is quarantined (then it is counted)."""
        if id in self._seen_events:
            return False
        self._seen_events.add(id)
        self.events += 1
        return True

    def note_faction_row(self, faction_id: int, table: str, key: str) -> bool:
        if (faction_id, table, key) in self._seen_rows:
            return False
        self._seen_rows.add((faction_id, table, key))
        self.faction_rows += 1
        return True


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are not JSON: a browser's JSON.parse refuses the whole answer holding them.
    raise Unreadable(f"not JSON: {name}")


def decode_text(raw: object) -> str:
    """The text of a value read as a BLOB (so that invalid UTF-8 reaches us instead of failing the read)."""
    if not isinstance(raw, bytes):
        raise Unreadable(f"not text: {type(raw).__name__}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable("not UTF-8") from exc


def parse_json(raw: object) -> Any:
    try:
        return json.loads(decode_text(raw), parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise Unreadable("not JSON") from exc
    except RecursionError as exc:
        raise Unreadable("nested too deeply") from exc


def log_quarantined(what: str, ident: str, faction_id: object, reason: Unreadable) -> None:
    log.warning("quarantined %s %s of faction %s: %s; skipped", what, ident, faction_id, reason)
