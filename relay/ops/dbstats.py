"""`relay db stats`: what the database holds, per faction, read strictly read-only in one snapshot.

Safe beside a running relay (a WAL reader never blocks the writer) and on a copied file (no upstream
settings needed). Errors: `DatabaseUnreadable`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from relay.ops import terminal
from relay.ops.offline import DatabaseUnreadable, open_read_only, recorded_schema_version
from relay.storage.database import side_file, table_names
from relay.storage.migrations import find_migrations, migrations_dir

SIDE_SUFFIXES = ("-wal", "-shm")


@dataclass(slots=True)
class FactionStats:
    faction_id: int
    active: bool | None = None  # None: events or rows without a subscription row
    subscribed_at: int | None = None
    last_activity_at: int | None = None
    events: int = 0
    oldest_event_at: int | None = None
    newest_event_at: int | None = None
    rows: dict[str, int] = field(default_factory=dict)  # stored rows per upstream table


@dataclass(frozen=True, slots=True)
class DatabaseStats:
    path: Path
    sizes: dict[str, int | None]  # file name -> bytes, None when absent; measured before opening
    schema_version: int
    newest_known_version: int  # the newest migration this relay has
    clock_high_water: int | None
    factions: list[FactionStats]
    state: str  # whether a WAL was found beside the file, and what that says


def read_stats(path: Path) -> DatabaseStats:
    """Everything `relay db stats` shows, read in one read transaction so the numbers agree."""
    # Before opening: a read-only open may itself leave an empty -wal and -shm behind.
    sizes = {
        candidate.name: candidate.stat().st_size if candidate.exists() else None
        for candidate in (path, *(side_file(path, suffix) for suffix in SIDE_SUFFIXES))
    }
    newest_known = find_migrations(migrations_dir())[-1].version
    connection, state = open_read_only(path)
    try:
        connection.execute("BEGIN")
        version = recorded_schema_version(connection, path)
        tables = table_names(connection)
        factions = _factions(connection, tables)
        high_water = (
            connection.execute("SELECT high_water FROM relay_clock").fetchone()
            if "relay_clock" in tables
            else None
        )
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        raise DatabaseUnreadable(f"cannot read {path}: {exc}") from exc
    finally:
        connection.close()
    return DatabaseStats(
        path=path,
        sizes=sizes,
        schema_version=version,
        newest_known_version=newest_known,
        clock_high_water=int(high_water[0]) if high_water else None,
        factions=sorted(factions.values(), key=lambda faction: faction.faction_id),
        state=state,
    )


def _factions(connection: sqlite3.Connection, tables: set[str]) -> dict[int, FactionStats]:
    factions: dict[int, FactionStats] = {}

    def faction(faction_id: int) -> FactionStats:
        return factions.setdefault(faction_id, FactionStats(faction_id))

    if "subscriptions" in tables:
        for faction_id, active, subscribed_at, last_activity_at in connection.execute(
            "SELECT faction_id, active, subscribed_at, last_activity_at FROM subscriptions"
        ):
            stats = faction(faction_id)
            stats.active, stats.subscribed_at, stats.last_activity_at = (
                bool(active),
                subscribed_at,
                last_activity_at,
            )
    if "events" in tables:
        for faction_id, count, oldest, newest in connection.execute(
            "SELECT faction_id, count(*), min(timestamp), max(timestamp) FROM events GROUP BY faction_id"
        ):
            stats = faction(faction_id)
            stats.events, stats.oldest_event_at, stats.newest_event_at = count, oldest, newest
    if "faction_rows" in tables:  # from migration 0003 on
        for faction_id, table_name, count in connection.execute(
            "SELECT faction_id, table_name, count(*) FROM faction_rows GROUP BY faction_id, table_name"
            " ORDER BY faction_id, table_name"
        ):
            faction(faction_id).rows[table_name] = count
    return factions


def render(stats: DatabaseStats, now_ms: int | None = None) -> str:
    """The report: a few header lines, then one table row per faction."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    versions = f"version {stats.schema_version} (this relay's newest: {stats.newest_known_version})"
    if stats.schema_version > stats.newest_known_version:
        versions += ": written by a newer relay, which this one refuses to serve"
    factions = stats.factions
    active = sum(faction.active is True for faction in factions)
    totals = (
        f"{len(factions)} factions ({active} active), {sum(faction.events for faction in factions)} events,"
        f" {sum(sum(faction.rows.values()) for faction in factions)} rows"
    )
    lines = [
        f"database  {stats.path}",
        "files     " + ", ".join(f"{name} {_size(count)}" for name, count in stats.sizes.items()),
        f"state     {stats.state}",
        f"schema    {versions}",
        f"clock     high water {_moment(stats.clock_high_water, now)}",
        f"totals    {totals}",
    ]
    headers = ["FACTION", "SUBSCRIPTION", "LAST ACTIVITY", "EVENTS", "OLDEST EVENT", "NEWEST EVENT", "ROWS"]
    rows = [
        [
            str(faction.faction_id),
            _subscription(faction.active),
            _moment(faction.last_activity_at, now),
            str(faction.events),
            _moment(faction.oldest_event_at, now),
            _moment(faction.newest_event_at, now),
            _rows(faction.rows.items()),
        ]
        for faction in factions
    ]
    return "\n".join([*lines, "", terminal.table(headers, rows) if rows else "(no factions)"])


def _size(count: int | None) -> str:
    return "absent" if count is None else terminal.size(count)


def _moment(at_ms: int | None, now_ms: int) -> str:
    # A never-set time is stored as 0 (relay_clock before the first event, relay_health before a probe).
    if not at_ms:
        return terminal.MISSING
    return f"{terminal.iso_time(at_ms)} ({terminal.age_since(at_ms, now_ms)} ago)"


def _subscription(active: bool | None) -> str:
    return terminal.MISSING if active is None else "active" if active else "expired"


def _rows(per_table: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{table} {count}" for table, count in per_table) or terminal.MISSING
