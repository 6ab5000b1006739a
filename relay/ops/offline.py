"""What the operator's commands read without a relay or an upstream: the config, loaded as `relay serve`
loads it but without needing the upstream's URL and key, and the database, opened strictly read-only.

Errors: `ConfigError` from loading; `DatabaseUnreadable` when the file cannot be read as a database.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Final

from relay.config import Config, load_config
from relay.storage.database import BUSY_TIMEOUT_MS, side_file, table_names
from relay.storage.migrations import recorded_version

# Stand-ins for the two keys that have no default, for commands that never connect upstream (an
# operator inspecting a copied database has neither at hand). `.invalid` can never resolve.
OFFLINE_URL: Final = "ws://offline.invalid/realtime/v1/websocket"
OFFLINE_KEY: Final = "offline"


class DatabaseUnreadable(Exception):
    """The file cannot be opened or read as the relay's database; one line naming the file and why."""


def load_offline(path: Path | None) -> Config:
    """The config `relay serve` would use (env over file over defaults), for everything but upstream:
    `upstream.url` and `upstream.anon_key` are replaced by stand-ins and must not be used."""
    return load_config(
        path, overrides={"RELAY_UPSTREAM_URL": OFFLINE_URL, "RELAY_UPSTREAM_ANON_KEY": OFFLINE_KEY}
    )


def open_read_only(path: Path) -> tuple[sqlite3.Connection, str]:
    """A connection that cannot write (`mode=ro`), and a line saying how the file was found.

    Without a `-wal` beside it the relay closed the file cleanly (a running relay always has one, if
    empty) and the main file holds everything, so it is read as immutable: no locks and no `-shm`
    index, so nothing is created beside it, even in a read-only folder. With a `-wal` the WAL must be
    read through its `-shm` index, which SQLite creates when missing; a read-only folder where it
    cannot is refused, since reading around the WAL would show stale data.
    """
    if not path.exists():
        raise DatabaseUnreadable(f"{path}: no such file")
    if not path.is_file():
        raise DatabaseUnreadable(f"{path}: not a file")
    uri = path.absolute().as_uri()
    wal = side_file(path, "-wal")
    if not wal.exists():
        target, note = f"{uri}?mode=ro&immutable=1", f"no {wal.name}: the file was closed cleanly"
    else:
        target, note = f"{uri}?mode=ro", f"{wal.name} present: a relay has the file open, or was stopped hard"
    try:
        return _checked(sqlite3.connect(target, uri=True, isolation_level=None)), note
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN and not os.access(path.parent, os.W_OK | os.X_OK):
            raise DatabaseUnreadable(
                f"cannot read {path}: its {wal.name} needs a {path.name}-shm that cannot be created in the "
                f"read-only folder {path.parent}; copy the database with its -wal to a writable folder"
            ) from exc
        raise DatabaseUnreadable(f"cannot read {path}: {exc}") from exc


def _checked(connection: sqlite3.Connection) -> sqlite3.Connection:
    # Opening is lazy: a missing -shm or a file that is not a database shows at the first read.
    try:
        # A read waits for the writer's checkpoint to let go, as the relay's own connections do.
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        connection.close()
        raise
    return connection


def recorded_schema_version(connection: sqlite3.Connection, path: Path) -> int:
    """The newest migration recorded in the database at `path` (0 for an empty file); refuses a
    database with tables of its own that the relay never made."""
    tables = table_names(connection)
    if not tables:
        return 0  # an empty file, which the relay migrates from the start
    if "schema_migrations" not in tables:
        raise DatabaseUnreadable(f"{path} is not a relay database: it has no schema_migrations table")
    return recorded_version(connection)
