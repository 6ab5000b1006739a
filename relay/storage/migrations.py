"""Applies the SQL files in `migrations/NNNN_name.sql`, in order, each with its record in one transaction.

Errors: `MigrationError` (a file cannot be applied, or the set of files is malformed), and its subclass
`DatabaseTooNew` (the database was written by a newer relay; refusing it protects the newer data).
"""

from __future__ import annotations

import datetime
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # relay/, this module being relay/storage/
# A wheel carries the files as relay/_migrations (pyproject's force-include); a checkout has them at
# the top of the repository, where an operator looks for them.
PACKAGED_DIR = _PACKAGE_DIR / "_migrations"
CHECKOUT_DIR = _PACKAGE_DIR.parent / "migrations"

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")

_RECORD_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


class MigrationError(Exception):
    """The schema cannot be brought up to date; the message names the file or versions involved."""


class DatabaseTooNew(MigrationError):
    """The database records a schema version above the newest file this relay has."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def migrations_dir() -> Path:
    """Where this installation keeps its migration files (the packaged copy wins)."""
    for candidate in (PACKAGED_DIR, CHECKOUT_DIR):
        if candidate.is_dir():
            return candidate
    raise MigrationError(f"no migrations folder found (looked in {PACKAGED_DIR} and {CHECKOUT_DIR})")


def find_migrations(directory: Path) -> list[Migration]:
    """The files in version order; refuses misnamed files, duplicate numbers and gaps."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path))
    if not found:
        raise MigrationError(f"no migration files in {directory}")
    for expected, migration in enumerate(found, start=1):
        # Sorted by name, so a duplicate or a gap shows as the first version out of step.
        if migration.version != expected:
            raise MigrationError(
                f"migration files must be numbered 1, 2, 3... without gaps or repeats: "
                f"expected {expected:04d}, found {migration.path.name}"
            )
    return found


def apply_migrations(conn: sqlite3.Connection, directory: Path | None = None) -> list[int]:
    """Bring the database up to the newest file; return the versions applied now (often none).

    `conn` must be in autocommit mode (`isolation_level=None`): each file is wrapped in an explicit
    BEGIN IMMEDIATE ... COMMIT together with its record, so a failure leaves no trace of that file.
    """
    if conn.isolation_level is not None:
        raise ValueError("apply_migrations needs a connection opened with isolation_level=None")
    migrations = find_migrations(directory or migrations_dir())
    conn.execute(_RECORD_TABLE)
    current = recorded_version(conn)
    newest = migrations[-1].version
    if current > newest:
        raise DatabaseTooNew(
            f"database schema version {current} is newer than this relay supports ({newest}); "
            "upgrade the relay"
        )
    applied = []
    for migration in migrations[current:]:
        if _apply_one(conn, migration):
            applied.append(migration.version)
    return applied


def recorded_version(conn: sqlite3.Connection) -> int:
    """The newest migration recorded in the database (0 for none); `schema_migrations` must exist."""
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def _apply_one(conn: sqlite3.Connection, migration: Migration) -> bool:
    """Apply one file and its record atomically; False if another process applied it first."""
    sql = migration.path.read_text(encoding="utf-8")
    # Not executescript: it commits any open transaction before running, which would split the
    # file from its record and leave a half-applied file behind on failure.
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-checked under the write lock: two relays starting on one file must not both apply it.
        if recorded_version(conn) >= migration.version:
            conn.execute("ROLLBACK")
            return False
        for statement in split_statements(sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, datetime.datetime.now(datetime.UTC).isoformat()),
        )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise MigrationError(f"migration {migration.path.name} failed and was rolled back: {exc}") from exc
    return True


def split_statements(sql: str) -> Iterator[str]:
    """The file's statements one by one, split where SQLite itself says a statement is complete.

    Accumulating up to each `;` and asking `sqlite3.complete_statement` keeps semicolons inside
    strings, comments and trigger bodies where they belong.
    """
    pending = ""
    for piece in sql.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    # What follows the last semicolon (the split added one too many) is a comment, blank, or a final
    # statement written without its semicolon.
    tail = pending[:-1]
    if tail.strip():
        yield tail
