"""Migrations on real SQLite files: applied once, atomically, and refused when the database is newer."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from relay.storage.migrations import (
    CHECKOUT_DIR,
    DatabaseTooNew,
    MigrationError,
    apply_migrations,
    migrations_dir,
    split_statements,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(tmp_path / "relay.db", isolation_level=None)) as connection:
        yield connection


def tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def recorded(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


def test_a_checkout_finds_the_repository_migrations() -> None:
    assert migrations_dir() == CHECKOUT_DIR
    assert (CHECKOUT_DIR / "0001_initial.sql").is_file()


SHIPPED = [(1, "initial"), (2, "relay_health"), (3, "faction_rows"), (4, "faction_baselines")]


def test_a_fresh_database_gets_every_shipped_migration_recorded(conn: sqlite3.Connection) -> None:
    assert apply_migrations(conn) == [version for version, _ in SHIPPED]
    assert recorded(conn) == SHIPPED
    (applied_at,) = conn.execute("SELECT applied_at FROM schema_migrations WHERE version = 1").fetchone()
    assert applied_at.endswith("+00:00")
    assert conn.execute("SELECT id, high_water FROM relay_clock").fetchall() == [(1, 0)]


def test_factions_served_before_baselines_keep_their_differences_as_events(
    tmp_path: Path, conn: sqlite3.Connection
) -> None:
    """An upgraded relay must not take a known faction's next read for its first: members have seen
    its history as events, and what changed while the relay was down must reach them as events too."""
    shipped = sorted(CHECKOUT_DIR.glob("000[123]_*.sql"))
    before = write_migrations(tmp_path / "before", {path.name: path.read_text() for path in shipped})
    apply_migrations(conn, before)
    conn.execute("INSERT INTO subscriptions VALUES (1, 1, 0, 0), (2, 0, 0, 0)")  # active, expired
    conn.execute("INSERT INTO faction_rows VALUES (3, 'war_calls', '7', '{\"id\": 7}')")  # rows only
    assert apply_migrations(conn) == [4]
    marked = conn.execute("SELECT faction_id, table_name FROM faction_baselines ORDER BY 1").fetchall()
    assert marked == [(1, "*"), (2, "*"), (3, "*")]


def test_reapplying_is_a_no_op(conn: sqlite3.Connection) -> None:
    apply_migrations(conn)
    assert apply_migrations(conn) == []
    assert recorded(conn) == SHIPPED


def test_the_tables_have_plain_names_for_the_sqlite3_shell(tmp_path: Path, conn: sqlite3.Connection) -> None:
    apply_migrations(conn)
    with closing(sqlite3.connect(tmp_path / "relay.db")) as operator:
        assert {"subscriptions", "events", "relay_clock", "schema_migrations"} <= tables(operator)
        columns = [row[1] for row in operator.execute("PRAGMA table_info(events)")]
        assert columns == ["id", "faction_id", "timestamp", "type", "data"]
        indexes = [row[1] for row in operator.execute("PRAGMA index_list(events)")]
        assert "events_faction_timestamp" in indexes


def test_a_failing_migration_rolls_back_completely(tmp_path: Path, conn: sqlite3.Connection) -> None:
    directory = write_migrations(
        tmp_path / "migrations",
        {
            "0001_first.sql": "CREATE TABLE first (x INTEGER);",
            # The failure is the third statement: the two before it must vanish with it.
            "0002_broken.sql": "CREATE TABLE second (y INTEGER);\nINSERT INTO first VALUES (1);\n"
            "INSERT INTO no_such_table VALUES (1);\n",
        },
    )
    with pytest.raises(MigrationError, match=r"0002_broken\.sql"):
        apply_migrations(conn, directory)
    assert "second" not in tables(conn)
    assert conn.execute("SELECT count(*) FROM first").fetchone() == (0,)
    assert recorded(conn) == [(1, "first")]
    assert not conn.in_transaction


def test_a_database_newer_than_the_files_is_refused(conn: sqlite3.Connection) -> None:
    apply_migrations(conn)
    conn.execute("INSERT INTO schema_migrations VALUES (9, 'from_the_future', '2030-01-01T00:00:00+00:00')")
    with pytest.raises(DatabaseTooNew) as refused:
        apply_migrations(conn)
    assert str(refused.value) == (
        f"database schema version 9 is newer than this relay supports ({len(SHIPPED)}); upgrade the relay"
    )
    assert isinstance(refused.value, MigrationError)


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        (["0001_a.sql", "0003_c.sql"], "expected 0002, found 0003_c.sql"),
        (["0001_a.sql", "0001_b.sql"], "expected 0002, found 0001_b.sql"),
        (["0002_b.sql"], "expected 0001, found 0002_b.sql"),
        (["0001_a.sql", "2_b.sql"], "2_b.sql is not named NNNN_name.sql"),
        ([], "no migration files"),
    ],
)
def test_malformed_sets_of_files_are_refused(
    tmp_path: Path, conn: sqlite3.Connection, names: list[str], complaint: str
) -> None:
    directory = write_migrations(tmp_path / "migrations", dict.fromkeys(names, "SELECT 1;"))
    with pytest.raises(MigrationError, match=complaint):
        apply_migrations(conn, directory)


def test_statements_split_where_sqlite_says_they_end() -> None:
    sql = (
        "-- a comment; with a semicolon\n"
        "CREATE TABLE t (x TEXT DEFAULT 'a;b');\n"
        "CREATE TRIGGER t_insert AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;\n"
        "/* closing remark; */\n"
    )
    statements = list(split_statements(sql))
    assert [statement.strip() for statement in statements[:2]] == [
        "-- a comment; with a semicolon\nCREATE TABLE t (x TEXT DEFAULT 'a;b');",
        "CREATE TRIGGER t_insert AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;",
    ]
    # What is left is the trailing comment, which SQLite runs as an empty statement.
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        for statement in statements:
            conn.execute(statement)
        assert {"t"} == tables(conn)


def test_a_connection_with_implicit_transactions_is_refused(tmp_path: Path) -> None:
    with (
        closing(sqlite3.connect(tmp_path / "relay.db")) as legacy,
        pytest.raises(ValueError, match="isolation_level"),
    ):
        apply_migrations(legacy)
