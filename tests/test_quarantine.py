"""Poisoned rows on a real SQLite file: a stored event or faction row that is not UTF-8 or not JSON
(written here with sqlite3, as an operator's shell or a bad restore would) is skipped at start-up with
one line naming it, counted, and never served; the rest is served as before."""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import trio

from relay.config import RetentionConfig
from relay.storage.store import open_store

pytestmark = pytest.mark.unit

FACTION = 46666
OTHER = 11581
SECRET = "only-in-the-poisoned-row"
KEYS = {"war_calls": "id"}


def poison(database: Path, *statements: str) -> None:
    with closing(sqlite3.connect(database, isolation_level=None)) as conn:
        for statement in statements:
            conn.execute(statement)


def war_call(kind: str, new: dict[str, object]) -> tuple[str, dict[str, object]]:
    change = {"table": "war_calls", "eventType": kind, "new": new, "old": {}}
    return "postgres_changes", {**change, "commit_timestamp": "2026-11-24T20:00:00Z"}


async def test_poisoned_events_and_rows_are_skipped_logged_once_each_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "relay.db"
    with trio.fail_after(10):
        async with open_store(
            database, retention=RetentionConfig(events_per_faction=100), key_columns=KEYS
        ) as store:
            kept, not_utf8, not_json, not_json_either = await store.append_events(
                FACTION, [("note", {"n": n}) for n in range(4)]
            )
            (other,) = await store.append_events(OTHER, [("note", {"n": 9})])
            await store.append_events(FACTION, [war_call("INSERT", {"id": 1}), war_call("INSERT", {"id": 2})])
        poison(
            database,
            f"UPDATE events SET data = CAST(x'fffe' AS TEXT) WHERE id = {not_utf8.id}",
            f"""UPDATE events SET data = '{{"broken {SECRET}' WHERE id = {not_json.id}""",
            f"UPDATE events SET data = '{{\"x\": NaN}}' WHERE id = {not_json_either.id}",
            f"""UPDATE faction_rows SET row = '{{"{SECRET}' WHERE row_key = '1'""",
        )
        caplog.set_level(logging.WARNING)
        async with open_store(
            database, retention=RetentionConfig(events_per_faction=100), key_columns=KEYS
        ) as store:
            events, _ = await store.read_since(FACTION, None)
            assert [e.id for e in events][:1] == [kept.id]
            assert {not_utf8.id, not_json.id, not_json_either.id}.isdisjoint(e.id for e in events)
            assert all(json.loads(e.json) for e in events)  # every answer spliced from these parses
            assert [e.id for e in (await store.read_since(OTHER, None))[0]] == [other.id]
            # The poisoned row is left out; the next reconcile stores the upstream row again.
            assert (await store.faction_state(FACTION)).tables == {"war_calls": [{"id": 2}]}
            # Read again (the rows live in the database): skipped again, counted and logged once.
            assert (await store.faction_state(FACTION)).tables == {"war_calls": [{"id": 2}]}
            stats = store.statistics()
            assert (stats.events_quarantined, stats.faction_rows_quarantined) == (3, 1)
            # A member whose cursor is before a skipped event never sees it: told `truncated`.
            assert store.missed_since(FACTION, kept.timestamp)
            assert not store.missed_since(FACTION, not_json_either.timestamp)
            assert not store.missed_since(OTHER, other.timestamp - 1)
    lines = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(lines) == 4
    assert all(SECRET not in line and "fffe" not in line for line in lines)
    assert f"event id={not_utf8.id} of faction {FACTION}: not UTF-8" in lines[0]
    assert "faction row war_calls/1 of faction 46666" in lines[-1]
    assert not any(r.exc_info for r in caplog.records)


async def test_a_poisoned_event_read_from_the_database_tells_the_members_behind_it_truncated(
    tmp_path: Path,
) -> None:
    """Older kept events are read from the database when a member asks for them (only the newest are
    held in memory): one skipped there is a gap, like one skipped at start-up."""
    database = tmp_path / "relay.db"
    small_memory = RetentionConfig(events_per_faction=100, memory_bytes_per_faction=16 * 1024)
    with trio.fail_after(10):
        async with open_store(database, retention=small_memory, key_columns=KEYS) as store:
            events = await store.append_events(FACTION, [("note", {"pad": "x" * 6_000}) for _ in range(8)])
        poison(database, f"UPDATE events SET data = '{{\"broken' WHERE id = {events[1].id}")
        async with open_store(database, retention=small_memory, key_columns=KEYS) as store:
            behind = events[0].timestamp
            assert not store.missed_since(FACTION, behind)  # not read yet: not known
            found, _ = await store.read_since(FACTION, behind)
            assert events[1].id not in [e.id for e in found]
            assert store.statistics().database_pages_read == 1  # it was the database's page
            assert store.missed_since(FACTION, behind)
            assert not store.missed_since(FACTION, events[1].timestamp)
