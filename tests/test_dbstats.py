"""`relay db stats` on databases made by the real store: the numbers per faction, a file left exactly as
it was, a read-only folder, and a relay writing to the same file meanwhile."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay.config import RetentionConfig
from relay.ops.dbstats import read_stats, render
from relay.ops.terminal import iso_time
from relay.service import RunningRelay
from relay.storage.migrations import find_migrations, migrations_dir
from relay.storage.store import Store, open_store
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.clocks import Clocks
from tests.helpers.factions import FACTION, OTHER_FACTION, call
from tests.helpers.operator_commands import run_relay_command
from tests.helpers.userscript import Userscript, wait_connected

START_MS = 1_732_460_000_000
MINUTE_MS = 60_000
NEWEST_VERSION = find_migrations(migrations_dir())[-1].version


def change(table: str, row_id: int, faction_id: int) -> tuple[str, dict[str, Any]]:
    return (
        "postgres_changes",
        {
            "schema": "public",
            "table": table,
            "commit_timestamp": "2026-11-24T15:00:00.000Z",
            "eventType": "INSERT",
            "new": {"id": row_id, "faction_id": faction_id},
            "old": {},
            "errors": None,
        },
    )


async def fill(store: Store, clock: Clocks) -> None:
    """Faction A: three events over two minutes, rows in two tables. Faction B: one event, expired."""
    await store.subscribe(FACTION)
    await store.subscribe(OTHER_FACTION)
    await store.append_events(
        FACTION, [change("war_calls", 1, FACTION), change("faction_messages", 7, FACTION)]
    )
    await store.append_events(OTHER_FACTION, [change("war_calls", 2, OTHER_FACTION)])
    clock.elapse(2 * MINUTE_MS)
    await store.append_events(FACTION, [("hospital_update", {"members": []})])
    await store.subscribe(FACTION)  # activity now; B's is two minutes old
    await store.expire_idle(MINUTE_MS)


async def made_by_the_store(path: Path) -> None:
    clock = Clocks(START_MS)
    key_columns = {"war_calls": "id", "faction_messages": "id"}
    with trio.fail_after(10):
        async with open_store(
            path,
            retention=RetentionConfig(events_per_faction=100),
            now_ms=clock,
            monotonic_s=clock.monotonic_s,
            key_columns=key_columns,
        ) as store:
            await fill(store, clock)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


@pytest.mark.unit
async def test_per_faction_counts_times_and_rows_of_a_store_made_database(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    await made_by_the_store(path)
    stats = read_stats(path)
    assert (stats.schema_version, stats.newest_known_version) == (NEWEST_VERSION, NEWEST_VERSION)
    assert stats.sizes["relay.db"] == path.stat().st_size
    assert stats.sizes["relay.db-wal"] is None  # checkpointed and removed at close
    b, a = stats.factions  # in faction id order
    assert (a.faction_id, a.active, a.events, a.rows) == (
        FACTION,
        True,
        3,
        {"faction_messages": 1, "war_calls": 1},
    )
    assert (b.faction_id, b.active, b.events, b.rows) == (OTHER_FACTION, False, 1, {"war_calls": 1})
    # Stamps are the store's clock made strictly increasing: A's two first events at START_MS and the
    # millisecond after it, B's at the next one.
    assert (a.oldest_event_at, a.newest_event_at) == (START_MS, START_MS + 2 * MINUTE_MS)
    assert (b.oldest_event_at, b.newest_event_at) == (START_MS + 2, START_MS + 2)
    assert (a.last_activity_at, b.last_activity_at) == (START_MS + 2 * MINUTE_MS, START_MS)
    assert stats.clock_high_water == START_MS + 2 * MINUTE_MS

    shown = render(stats, now_ms=START_MS + 5 * MINUTE_MS).splitlines()
    assert f"schema    version {NEWEST_VERSION} (this relay's newest: {NEWEST_VERSION})" in shown
    assert "totals    2 factions (1 active), 4 events, 3 rows" in shown
    (row_a,) = [line for line in shown if line.startswith(str(FACTION))]
    assert row_a.split() == [
        str(FACTION),
        "active",
        iso_time(START_MS + 2 * MINUTE_MS),
        "(3m",
        "ago)",
        "3",
        iso_time(START_MS),
        "(5m",
        "ago)",
        iso_time(START_MS + 2 * MINUTE_MS),
        "(3m",
        "ago)",
        "faction_messages",
        "1,",
        "war_calls",
        "1",
    ]
    (row_b,) = [line for line in shown if line.startswith(str(OTHER_FACTION))]
    assert row_b.split()[1] == "expired"


@pytest.mark.e2e
async def test_the_command_leaves_the_file_and_its_folder_exactly_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "data" / "relay.db"
    await made_by_the_store(path)
    before = snapshot(path.parent)
    ran = await run_relay_command("db", "stats", "--db", path)
    assert (ran.status, ran.err) == (0, "")
    assert f"database  {path}" in ran.out
    assert "state     no relay.db-wal: the file was closed cleanly" in ran.out
    assert snapshot(path.parent) == before  # bytes and mtimes; no -wal or -shm created beside it


@pytest.mark.e2e
async def test_a_read_only_folder_is_read_and_an_unindexable_wal_is_refused(tmp_path: Path) -> None:
    """chattr +i: nothing can be created in the folder, not even by root."""
    clean, copied = tmp_path / "clean" / "relay.db", tmp_path / "copied" / "relay.db"
    await made_by_the_store(clean)
    clock = Clocks(START_MS)
    with trio.fail_after(10):
        async with open_store(
            tmp_path / "live" / "relay.db",
            retention=RetentionConfig(events_per_faction=100),
            now_ms=clock,
            monotonic_s=clock.monotonic_s,
        ) as store:
            await fill(store, clock)
            copied.parent.mkdir()
            for name in ("relay.db", "relay.db-wal"):  # a copy taken while a relay ran, without the -shm
                shutil.copy(tmp_path / "live" / name, copied.parent / name)
    await chattr("+i", clean.parent, copied.parent)
    try:
        readable = await run_relay_command("db", "stats", "--db", clean)
        refused = await run_relay_command("db", "stats", "--db", copied)
    finally:
        await chattr("-i", clean.parent, copied.parent)
    assert (readable.status, readable.err) == (0, "")
    assert "totals    2 factions (1 active), 4 events, 3 rows" in readable.out
    assert refused.status == 2
    assert refused.error_lines == [
        f"relay: cannot read {copied}: its relay.db-wal needs a relay.db-shm that cannot be created in the "
        f"read-only folder {copied.parent}; copy the database with its -wal to a writable folder"
    ]
    # Copied to a writable folder, the WAL's events are read (B's expiry lives only in the WAL).
    shutil.copytree(copied.parent, tmp_path / "writable")
    stats = read_stats(tmp_path / "writable" / "relay.db")
    assert [(f.faction_id, f.active, f.events) for f in stats.factions] == [
        (OTHER_FACTION, False, 1),
        (FACTION, True, 3),
    ]


async def chattr(flag: str, *paths: Path) -> None:
    await trio.run_process(["chattr", flag, *map(str, paths)])


@pytest.mark.e2e
async def test_while_a_relay_is_writing_to_the_same_file(
    relay: RunningRelay, fake_upstream: FakeSupabase, tmp_path: Path
) -> None:
    path = tmp_path / "data" / "relay.db"  # where conftest's make_config puts it
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            for call_id in (1, 2):
                fake_upstream.insert("war_calls", call(FACTION, call_id))
            await script.poll_until(2)
            during = await run_relay_command("db", "stats", "--db", path)
            fake_upstream.insert("war_calls", call(FACTION, 3))  # the relay still writes and serves
            await script.poll_until(3)
            after = await run_relay_command("db", "stats", "--db", path)
    assert (during.status, during.err) == (0, "")
    assert "state     relay.db-wal present: a relay has the file open, or was stopped hard" in during.out
    assert faction_row(during.out)[:2] == [str(FACTION), "active"]
    assert faction_row(during.out)[-2:] == ["war_calls", "2"]
    assert faction_row(after.out)[-2:] == ["war_calls", "3"]


def faction_row(output: str) -> list[str]:
    (row,) = [line.split() for line in output.splitlines() if line.startswith(str(FACTION))]
    return row


@pytest.mark.e2e
async def test_a_config_without_upstream_settings_is_enough_to_find_the_database(tmp_path: Path) -> None:
    await made_by_the_store(tmp_path / "copy" / "relay.db")
    config = tmp_path / "relay.toml"
    config.write_text('[storage]\npath = "copy/relay.db"\n')  # no url, no anon key anywhere
    ran = await run_relay_command("db", "stats", "--config", config)
    assert (ran.status, ran.err) == (0, "")
    assert f"database  {tmp_path / 'copy' / 'relay.db'}" in ran.out


@pytest.mark.e2e
async def test_an_old_key_name_in_the_config_is_one_warning_and_the_stats_still_print(tmp_path: Path) -> None:
    await made_by_the_store(tmp_path / "copy" / "relay.db")
    config = tmp_path / "relay.toml"
    config.write_text('[storage]\npath = "copy/relay.db"\n[retention]\nsubscription_ttl = 600.0\n')
    ran = await run_relay_command("db", "stats", "--config", config)
    assert ran.status == 0
    assert len(ran.error_lines) == 1
    assert "retention.subscription_ttl in" in ran.err
    assert "call it retention.subscription_ttl_s" in ran.err
    assert f"database  {tmp_path / 'copy' / 'relay.db'}" in ran.out


@pytest.mark.e2e
async def test_a_missing_file_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    ran = await run_relay_command("db", "stats", "--db", tmp_path / "nowhere.db")
    assert (ran.status, ran.out) == (2, "")
    assert ran.error_lines == [f"relay: {tmp_path / 'nowhere.db'}: no such file"]
    assert not (tmp_path / "nowhere.db").exists()


@pytest.mark.e2e
async def test_a_file_that_is_not_a_relay_database_is_one_line(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    other.write_bytes(b"not a database at all" * 100)
    ran = await run_relay_command("db", "stats", "--db", other)
    assert ran.status == 2
    assert ran.error_lines == [f"relay: cannot read {other}: file is not a database"]
