"""Telling whether a `-wal` belongs to the database file beside it, on real SQLite files: a crash image
(the files copied while a connection still has them open, as `kill -9` leaves them) is let through,
and the same log beside another copy of the file is refused."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from relay.config import RetentionConfig
from relay.storage.lineage import StaleWriteAheadLog, check_wal_belongs, database_mark, last_committed_mark
from relay.storage.store import open_store

pytestmark = pytest.mark.unit


def open_wal_database(path: Path, *statements: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # the log keeps everything until the test copies it
    for statement in statements:
        conn.execute(statement)
    return conn


def crash_image(source: Path, into: Path) -> Path:
    """The database and its log as a `kill -9` leaves them: copied while the connection is open."""
    into.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(source.with_name(source.name + suffix), into / (source.name + suffix))
    return into / source.name


def test_a_crash_image_is_let_through_and_a_restored_copy_beside_its_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = open_wal_database(
        path, "CREATE TABLE events (data TEXT)", "PRAGMA user_version = 11", "PRAGMA wal_checkpoint(TRUNCATE)"
    )
    backup = tmp_path / "backup.db"
    shutil.copyfile(path, backup)  # the operator's copy, marked 11
    conn.execute("PRAGMA user_version = 12")  # the next start's mark
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA user_version = 12")  # page 1 opens the new log generation
    conn.executemany("INSERT INTO events VALUES (?)", [("x" * 500,)] * 50)
    image = crash_image(path, tmp_path / "crashed")
    conn.close()

    assert last_committed_mark(image.with_name("relay.db-wal")) == 12
    check_wal_belongs(image)  # the log belongs to its file: no refusal

    shutil.copyfile(backup, image)
    with pytest.raises(StaleWriteAheadLog, match=r"delete relay\.db-wal and relay\.db-shm"):
        check_wal_belongs(image)


def test_frames_after_the_last_commit_and_a_torn_frame_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = open_wal_database(
        path, "PRAGMA user_version = 5", "CREATE TABLE events (data TEXT)", "BEGIN", "PRAGMA user_version = 6"
    )
    conn.executemany("INSERT INTO events VALUES (?)", [("y" * 500,)] * 50)
    conn.execute("PRAGMA cache_size = 1")  # spill uncommitted pages into the log
    conn.executemany("INSERT INTO events VALUES (?)", [("z" * 3000,)] * 200)
    image = crash_image(path, tmp_path / "crashed")
    conn.execute("ROLLBACK")
    conn.close()
    wal = image.with_name("relay.db-wal")
    assert last_committed_mark(wal) == 5
    wal.write_bytes(wal.read_bytes()[:-100])  # the last frame half written
    assert last_committed_mark(wal) == 5


def test_no_log_an_empty_log_or_a_log_without_page_one_cannot_be_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = open_wal_database(
        path,
        "CREATE TABLE events (data TEXT)",
        "PRAGMA user_version = 7",
        "INSERT INTO events VALUES ('a')",
        "PRAGMA wal_checkpoint(TRUNCATE)",
    )
    check_wal_belongs(path)  # an empty log
    conn.execute("INSERT INTO events VALUES ('b')")  # one page of the table, not page 1
    image = crash_image(path, tmp_path / "crashed")
    conn.close()
    assert last_committed_mark(image.with_name("relay.db-wal")) is None
    check_wal_belongs(image)
    image.with_name("relay.db-wal").unlink()
    check_wal_belongs(image)


async def test_a_reader_holding_the_log_at_start_keeps_the_old_mark_and_no_crash_image_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"
    async with open_store(path, retention=RetentionConfig(events_per_faction=10)) as store:
        await store.append_events(1, [("chat", {"n": 1})])
    first_mark = database_mark(path)
    # An operator's sqlite3 shell in the middle of a read: the start's checkpoint cannot fold the
    # log, so a new mark would be left in the log only, and the next start would refuse that log.
    with closing(sqlite3.connect(path, isolation_level=None)) as shell:
        shell.execute("BEGIN")
        shell.execute("SELECT count(*) FROM events").fetchall()
        async with open_store(path, retention=RetentionConfig(events_per_faction=10)) as store:
            await store.append_events(1, [("chat", {"n": 2})])
            image = crash_image(path, tmp_path / "crashed")
        shell.execute("COMMIT")
    assert database_mark(image) == first_mark
    check_wal_belongs(image)
