"""The database seam on a real SQLite file: writes in their own transaction, a cancelled write seen
out, a write fault remembered until a write works again. Worker threads, so the real Trio clock."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.storage.database import Database, StoreError, open_database, side_file, table_names

pytestmark = pytest.mark.unit

TEST_TIMEOUT_S = 10
HOLD_LIMIT_S = 5  # a held write thread gives up after this long, so a failing test cannot hang


async def opened(path: Path) -> Database:
    database, tables = await open_database(path, table_names)
    assert {"events", "subscriptions", "relay_clock", "schema_migrations"} <= tables
    return database


def probed_at(conn: sqlite3.Connection) -> list[tuple[int]]:
    return conn.execute("SELECT probed_at FROM relay_health").fetchall()


async def close(database: Database) -> None:
    async def nothing() -> None:
        pass

    await database.close(last_writes=nothing)


async def test_a_failed_write_leaves_nothing_and_is_remembered_until_one_works(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        database = await opened(tmp_path / "relay.db")

        def half_done(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE relay_health SET probed_at = 1")
            conn.execute("INSERT INTO no_such_table VALUES (1)")

        with pytest.raises(StoreError, match="database write failed: no such table"):
            await database.write(half_done)
        assert database.write_fault is not None
        assert await database.read(probed_at) == [(0,)]  # rolled back whole
        await database.write(lambda conn: conn.execute("UPDATE relay_health SET probed_at = 2"))
        assert database.write_fault is None
        assert await database.read(probed_at) == [(2,)]
        await close(database)


async def test_a_cancelled_write_is_seen_out_before_its_caller_goes_on(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    def held(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(HOLD_LIMIT_S)
        conn.execute("UPDATE relay_health SET probed_at = 42")

    with trio.fail_after(TEST_TIMEOUT_S):
        database = await opened(tmp_path / "relay.db")
        scope = trio.CancelScope()
        went_on = trio.Event()

        async def write() -> None:
            with scope:
                await database.write(held)
            went_on.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            assert await trio.to_thread.run_sync(entered.wait, HOLD_LIMIT_S)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not went_on.is_set()  # not abandoned: the caller waits for its write
            release.set()
        assert await database.read(probed_at) == [(42,)]
        await close(database)


async def test_a_read_fault_is_a_store_error(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        database = await opened(tmp_path / "relay.db")
        with pytest.raises(StoreError, match="database read failed"):
            await database.read(lambda conn: conn.execute("SELECT * FROM no_such_table").fetchall())
        with pytest.raises(StoreError, match="database read failed"):  # the reader writes nothing
            await database.read(lambda conn: conn.execute("UPDATE relay_health SET probed_at = 3"))
        await close(database)


async def test_file_sizes_count_the_wal_until_the_close_checkpoints_it(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    with trio.fail_after(TEST_TIMEOUT_S):
        database = await opened(path)
        await database.write(lambda conn: conn.execute("UPDATE relay_health SET probed_at = 4"))
        sizes = database.file_sizes()
        assert sizes.database_bytes == path.stat().st_size
        assert sizes.wal_bytes == side_file(path, "-wal").stat().st_size > 0
        await close(database)
    assert not side_file(path, "-wal").exists() or side_file(path, "-wal").stat().st_size == 0
