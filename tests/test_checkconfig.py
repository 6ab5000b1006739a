"""`relay check-config`: the effective config as TOML that loads back to the same config, secrets never
shown whole, and every problem `relay serve` would meet offline as one line and exit status 2."""

from __future__ import annotations

import dataclasses
import sqlite3
import tomllib
from contextlib import closing
from pathlib import Path

import pytest
import trio

from relay.config import SECTIONS, load_config
from relay.ops.checkconfig import check_config, mask, mask_url, render
from relay.storage.migrations import apply_migrations
from tests.helpers.operator_commands import run_relay_command

URL = "wss://abcdefgh.supabase.co/realtime/v1/websocket"
ANON_KEY = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.the-rest-of-the-anon-key"
API_KEYS = ("first-member-key-0123456789", "second-member-key-987654321")
CONFIG = f"""
[server]
port = 9001
[upstream]
url = "{URL}"
backoff_max_s = 30.0
[[upstream.channels]]
table = "war_calls"
filter = "faction_id=eq.{{faction_id}}"
key = "call_id"
deletes = "filtered"
[retention]
events_per_faction = 250
[auth]
api_keys = ["{API_KEYS[0]}", "{API_KEYS[1]}"]
[logging]
levels = {{ "relay.storage.store" = "DEBUG", hypercorn = "WARNING" }}
"""


def write_config(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


@pytest.mark.unit
def test_the_output_loads_back_to_the_same_config_with_the_secrets_kept_where_they_were(
    tmp_path: Path,
) -> None:
    environ = {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY, "RELAY_SERVER_HOST": "0.0.0.0"}
    checked = check_config(write_config(tmp_path), environ)
    assert checked.problems == []
    assert checked.config is not None
    shown = render(checked.config, environ)

    pasted = tmp_path / "pasted" / "relay.toml"
    pasted.parent.mkdir()
    # The operator keeps their api_keys line: it is shown only masked, as a comment.
    pasted.write_text(shown.replace("[auth]\n", f'[auth]\napi_keys = ["{API_KEYS[0]}", "{API_KEYS[1]}"]\n'))
    again = load_config(pasted, environ=environ)
    assert dataclasses.replace(again, source=None) == dataclasses.replace(checked.config, source=None)


@pytest.mark.unit
def test_old_key_names_are_shown_by_their_new_names_and_load_back_the_same(tmp_path: Path) -> None:
    environ = {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    old_names = (
        f'[upstream]\nurl = "{URL}"\nheartbeat_interval = 5.0\n[retention]\nsubscription_ttl = 600.0\n'
    )
    checked = check_config(write_config(tmp_path, old_names), environ)
    assert checked.problems == []
    assert checked.config is not None
    assert len(checked.config.warnings) == 2
    shown = render(checked.config, environ)
    lines = shown.splitlines()
    assert "heartbeat_interval_s = 5.0  # default 25.0" in lines
    assert "subscription_ttl_s = 600.0  # default 1800.0" in lines
    assert not any(line.startswith(("heartbeat_interval ", "subscription_ttl ")) for line in lines)

    pasted = tmp_path / "pasted" / "relay.toml"
    pasted.parent.mkdir()
    pasted.write_text(shown)
    again = load_config(pasted, environ=environ)
    assert again.warnings == ()
    assert dataclasses.replace(again, source=None) == dataclasses.replace(checked.config, source=None)


@pytest.mark.unit
def test_every_key_is_there_with_env_overrides_and_changed_defaults_said(tmp_path: Path) -> None:
    environ = {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY, "RELAY_SERVER_HOST": "0.0.0.0"}
    checked = check_config(write_config(tmp_path), environ)
    assert checked.config is not None
    shown = render(checked.config, environ)
    document = tomllib.loads(shown)
    assert set(document) == set(SECTIONS)
    assert len(document["limits"]) == len(dataclasses.fields(checked.config.limits))  # defaults too
    assert document["upstream"]["channels"] == [
        {
            "table": "war_calls",
            "filter": "faction_id=eq.{faction_id}",
            "key": "call_id",
            "deletes": "filtered",
        }
    ]
    assert document["storage"]["path"] == str(tmp_path / "data" / "relay.db")  # resolved, as serve uses it
    lines = shown.splitlines()
    assert 'host = "0.0.0.0"  # from RELAY_SERVER_HOST; default "127.0.0.1"' in lines
    assert "port = 9001  # default 8444" in lines
    assert "max_body_bytes = 16384" in lines
    assert 'levels = { "hypercorn" = "WARNING", "relay.storage.store" = "DEBUG" }  # default {}' in lines
    assert f"# The effective configuration of {tmp_path / 'relay.toml'}." in lines


@pytest.mark.unit
def test_secrets_are_masked_and_never_shown_whole(tmp_path: Path) -> None:
    environ = {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    checked = check_config(write_config(tmp_path), environ)
    assert checked.config is not None
    shown = render(checked.config, environ)
    for secret in (ANON_KEY, *API_KEYS):
        assert secret not in shown
        assert secret[:8] not in shown
    lines = shown.splitlines()
    assert (
        f'# anon_key = "eyJh…"  # masked, {len(ANON_KEY)} characters; from RELAY_UPSTREAM_ANON_KEY' in lines
    )
    assert '# api_keys = ["firs…", "seco…"]  # masked, 2 keys' in lines
    assert "anon_key" not in tomllib.loads(shown)["upstream"]


@pytest.mark.unit
def test_an_anon_key_in_the_file_is_masked_and_better_moved_to_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[upstream]\nurl = "{URL}"\nanon_key = "{ANON_KEY}"\n')
    checked = check_config(config, {})
    assert checked.config is not None
    shown = render(checked.config, {})
    assert ANON_KEY not in shown
    assert (
        f'# anon_key = "eyJh…"  # masked, {len(ANON_KEY)} characters; better set as RELAY_UPSTREAM_ANON_KEY'
        in shown.splitlines()
    )


@pytest.mark.unit
def test_masks_show_a_few_characters_of_a_long_secret_and_none_of_a_short_one() -> None:
    assert mask(ANON_KEY) == "eyJh…"
    assert mask("short-key") == "***"
    assert mask_url(f"wss://h.example/realtime/v1/websocket?apikey={ANON_KEY}&vsn=1.0.0") == (
        "wss://h.example/realtime/v1/websocket?apikey=eyJh…&vsn=1.0.0"
    )
    assert mask_url("https://user:hunter2-password@h.example/rest/v1") == "https://user:***@h.example/rest/v1"
    assert mask_url(URL) == URL


@pytest.mark.unit
def test_a_missing_anon_key_does_not_hide_the_other_problems(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    config = write_config(
        tmp_path,
        '[storage]\npath = "not-a-folder/relay.db"\n'
        '[upstream]\nurl = "wss://YOUR-PROJECT-REF.supabase.co/realtime/v1/websocket"\n',
    )
    checked = check_config(config, {})
    assert checked.anon_key_missing
    assert len(checked.problems) == 3, checked.problems
    missing_key, example_url, storage = checked.problems
    assert missing_key.startswith("upstream.anon_key is not set")
    assert example_url.startswith("upstream.url still names the example project (YOUR-PROJECT-REF)")
    assert storage == (
        f"storage.path: cannot create the folder {tmp_path / 'not-a-folder'}: "
        f"{tmp_path / 'not-a-folder'} is not a folder"
    )
    assert checked.config is not None
    assert "# anon_key is not set  # set RELAY_UPSTREAM_ANON_KEY" in render(
        checked.config, {}, anon_key_missing=True
    )


@pytest.mark.e2e
async def test_problems_are_one_line_each_on_stderr_and_exit_status_2(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    config = write_config(tmp_path, f'[storage]\npath = "not-a-folder/relay.db"\n[upstream]\nurl = "{URL}"\n')
    ran = await run_relay_command("check-config", "--config", config)
    assert ran.status == 2
    assert [line.split(" ", 2)[:2] for line in ran.error_lines] == [
        ["relay:", "upstream.anon_key"],
        ["relay:", "storage.path:"],
    ]
    assert "# anon_key is not set" in ran.out  # what could be loaded is still shown


@pytest.mark.e2e
async def test_a_good_config_exits_0_and_prints_only_the_toml(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ran = await run_relay_command(
        "check-config", "--config", config, variables={"RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    )
    assert (ran.status, ran.err) == (0, "")
    assert tomllib.loads(ran.out)["retention"]["events_per_faction"] == 250
    assert ANON_KEY not in ran.out


@pytest.mark.e2e
async def test_an_old_key_name_is_one_warning_on_stderr_and_its_new_name_on_stdout(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[upstream]\nurl = "{URL}"\nbackoff_max = 30.0\n')
    ran = await run_relay_command(
        "check-config", "--config", config, variables={"RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    )
    assert ran.status == 0
    assert len(ran.error_lines) == 1
    assert "WARNING" in ran.error_lines[0]
    assert f"upstream.backoff_max in {config} is an old name: call it upstream.backoff_max_s" in ran.err
    upstream = tomllib.loads(ran.out)["upstream"]
    assert upstream["backoff_max_s"] == 30.0
    assert "backoff_max" not in upstream


@pytest.mark.e2e
async def test_a_refused_config_is_one_line_and_nothing_on_stdout(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[upstream]\nurl = "{URL}"\nurll = "typo"\n')
    ran = await run_relay_command(
        "check-config", "--config", config, variables={"RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    )
    assert (ran.status, ran.out) == (2, "")
    assert len(ran.error_lines) == 1
    assert ran.error_lines[0].startswith("relay: unknown key upstream.urll")


def make_database(path: Path, *, version: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        apply_migrations(connection)
        if version is not None:  # as a newer relay would have recorded it
            connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 'x')",
                (version,),
            )


@pytest.mark.unit
def test_a_database_newer_than_this_relay_is_a_problem_and_is_left_untouched(tmp_path: Path) -> None:
    database = tmp_path / "data" / "relay.db"
    make_database(database, version=99)
    before = (database.read_bytes(), database.stat().st_mtime_ns)
    checked = check_config(write_config(tmp_path), {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY})
    (problem,) = checked.problems
    assert problem.startswith(
        f"storage.path: {database} has schema version 99, newer than this relay supports"
    )
    assert (database.read_bytes(), database.stat().st_mtime_ns) == before
    assert sorted(p.name for p in database.parent.iterdir()) == ["relay.db"]  # nothing created beside it


@pytest.mark.unit
def test_a_database_of_this_relay_is_fine(tmp_path: Path) -> None:
    make_database(tmp_path / "data" / "relay.db")
    assert check_config(write_config(tmp_path), {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY}).problems == []


async def chattr(flag: str, path: Path) -> None:
    await trio.run_process(["chattr", flag, str(path)])


@pytest.mark.unit
@pytest.mark.parametrize("existing", [True, False], ids=["database folder", "folder to create in"])
async def test_a_storage_folder_that_cannot_be_written_is_a_problem(tmp_path: Path, existing: bool) -> None:
    """chattr +i refuses writes even to root, who ignores permission bits."""
    locked = tmp_path / "locked"
    locked.mkdir()
    path = locked / "relay.db" if existing else locked / "data" / "relay.db"
    config = write_config(tmp_path, f'[storage]\npath = "{path}"\n[upstream]\nurl = "{URL}"\n')
    await chattr("+i", locked)
    try:
        checked = check_config(config, {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY})
    finally:
        await chattr("-i", locked)
    assert checked.problems == [f"storage.path: this user cannot create files in the folder {locked}"]


@pytest.mark.unit
def test_a_storage_path_from_the_environment_is_named_as_the_variable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    environ = {"RELAY_UPSTREAM_ANON_KEY": ANON_KEY, "RELAY_STORAGE_PATH": str(tmp_path / "a-file" / "x.db")}
    (problem,) = check_config(write_config(tmp_path), environ).problems
    assert problem.startswith("RELAY_STORAGE_PATH: cannot create the folder")
