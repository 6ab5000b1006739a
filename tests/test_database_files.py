"""The database file under an operator's hands, on a real `relay serve`: a file that cannot be opened,
and a copy restored beside the `-wal` of the file it replaced. Each refusal is one line and the exit
status the systemd unit does not restart (`RestartPreventExitStatus`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from relay.cli import EXIT_STORAGE_ERROR
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, call
from tests.helpers.relay_process import RELAY, relay_process
from tests.helpers.userscript import Userscript, wait_connected

pytestmark = pytest.mark.e2e


async def serve_until_exit(config: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    result = await trio.run_process(
        [RELAY, "serve", "--config", str(config)], capture_stderr=True, check=False, env=env
    )
    return result.returncode, result.stderr.decode().strip().splitlines()


def database(config: Path) -> Path:
    return config.parent / "data" / "relay.db"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda db: db.write_bytes(b"not a database, " * 512), "file is not a database"),
        # Tests run as root, whom permissions do not stop: a folder in the file's place cannot be opened.
        (lambda db: (db.unlink(), db.mkdir()), "Is a directory"),
    ],
    ids=["garbage", "a folder"],
)
async def test_a_database_that_cannot_be_opened_is_one_line_and_not_restarted(
    serve_config: tuple[Path, dict[str, str]], damage: object, reason: str
) -> None:
    config, env = serve_config
    db = database(config)
    db.parent.mkdir()
    db.write_bytes(b"")
    damage(db)  # type: ignore[operator]
    with trio.fail_after(30):
        status, lines = await serve_until_exit(config, env)
    assert status == EXIT_STORAGE_ERROR
    (line,) = [line for line in lines if line.startswith("relay: ")]
    assert reason in line
    assert "will not start until this is fixed" in line
    assert "-wal" in line


async def serve_a_page(
    config: Path, env: dict[str, str], upstream: FakeSupabase, calls: range, *, kill: bool
) -> Userscript:
    """Today's script subscribes and sees `calls` arrive; then the relay is stopped, by SIGTERM or
    by `kill -9` (which leaves a -wal behind)."""
    with trio.fail_after(30):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()  # the only subscribe this page ever makes
            await wait_connected(http, FACTION)
            for n in calls:
                upstream.insert("war_calls", call(FACTION, n))
            await script.poll_until(len(calls))
            if kill:
                relay.process.kill()
                await relay.process.wait()
            else:
                relay.process.send_signal(signal.SIGTERM)
                assert await relay.process.wait() == 0
    return script


async def test_a_copy_restored_beside_a_stale_wal_is_refused_in_one_line_and_left_intact(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    db = database(config)
    await serve_a_page(config, env, fake_upstream, range(0), kill=False)
    copy = db.with_name("relay.db.copy")
    shutil.copyfile(db, copy)  # the operator's backup, taken while the relay is stopped
    # Fewer than `retention.events_per_faction`: a larger burst lands in one commit and is rightly
    # `truncated` for a script behind it, which is not what this test is about.
    await serve_a_page(config, env, fake_upstream, range(1, 90), kill=True)
    assert db.with_name("relay.db-wal").stat().st_size > 0
    shutil.copyfile(copy, db)  # the README's rollback, with the crashed relay's -wal still beside it

    with trio.fail_after(30):
        status, lines = await serve_until_exit(config, env)
    assert status == EXIT_STORAGE_ERROR
    (line,) = [line for line in lines if line.startswith("relay: ")]
    assert "relay.db-wal" in line
    assert "delete" in line
    assert db.read_bytes() == copy.read_bytes()  # the restored copy is untouched

    # Following the line's advice starts the relay from the copy.
    for side in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            db.with_name("relay.db" + side).unlink()
    with trio.fail_after(30):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            await wait_connected(http, FACTION)
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def database_files(db: Path) -> list[Path]:
    return [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm")]


@pytest.mark.parametrize("how", ["deleted", "overwritten with a copy", "replaced by rename"])
async def test_a_database_file_deleted_or_replaced_while_running_is_reported(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase, how: str
) -> None:
    config, env = serve_config
    db = database(config)
    other = config.parent / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with trio.fail_after(30):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            assert (await http.get("/health")).status_code == 200
            if how == "deleted":
                for path in database_files(db):
                    path.unlink(missing_ok=True)
                reason = "deleted or moved away"
            elif how == "overwritten with a copy":
                shutil.copyfile(other, db)  # in place: the same inode, another file's contents
                reason = "replaced by another file"
            else:
                other.replace(db)
                reason = "replaced by another file"
            answer = await http.get("/health")
            assert answer.status_code == 503
            assert reason in answer.json()["error"]
            metrics = (await http.get("/metrics")).text
            assert "cat_relay_storage_file_replaced 1.0" in metrics
            await script.poll()  # members are still served, from memory
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    (logged,) = [line for line in relay.log if reason in line]
    assert "ERROR" in logged


async def test_todays_script_gets_its_events_again_after_a_restart_on_an_empty_database(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    db = database(config)
    script = await serve_a_page(config, env, fake_upstream, range(1, 2), kill=False)
    with trio.fail_after(60):
        for path in database_files(db):  # the operator starts afresh: `rm relay.db*`
            path.unlink(missing_ok=True)
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script.http = http  # the same page, same faction and cursor, no new subscribe
            fake_upstream.insert("war_calls", call(FACTION, 2))
            await script.poll()  # revives the faction: its socket, then its reconcile
            await wait_connected(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 3))
            await eventually_polled(script, 3)
            # Only factions subscribed with a key are remembered: a poll alone still creates nothing.
            stranger = await http.get("/events", params={"faction_id": FACTION + 1, "since": 0})
            assert stranger.status_code == 404
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    assert any("on standby" in line and "WARNING" in line for line in relay.log)


async def eventually_polled(script: Userscript, call_id: int) -> None:
    def ids() -> set[int]:
        return {event["data"]["new"]["id"] for event in script.events if event["data"].get("new")}

    while call_id not in ids():
        await script.poll()
        await trio.sleep(0.1)
