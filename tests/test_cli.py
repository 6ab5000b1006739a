"""`relay serve` as an operator runs it: a real process, signals, a kill -9 and a restart."""

from __future__ import annotations

import contextlib
import gc
import re
import signal
import sqlite3
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay.cli import GC_THRESHOLDS, build_parser, tune_garbage_collector
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, call
from tests.helpers.relay_process import RELAY, relay_process
from tests.helpers.userscript import Userscript, wait_connected
from tests.helpers.waits import eventually, eventually_async


@pytest.mark.e2e
async def test_sigterm_shuts_down_cleanly(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    with trio.fail_after(30):
        async with relay_process(config, env) as relay:
            async with httpx.AsyncClient(base_url=relay.url) as http:
                await Userscript(http, FACTION).start()
                await wait_connected(http, FACTION)
            relay.process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await relay.process.wait() == 0
            await eventually(lambda: "relay stopped" in relay.text())
    assert not fake_upstream.connections
    assert "Traceback" not in relay.text()
    database = config.parent / "data" / "relay.db"
    wal = database.with_name("relay.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed and closed


@pytest.mark.e2e
async def test_kill_9_mid_stream_loses_nothing_a_client_saw_and_resumes_without_resubscribing(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    emitted = 0

    async def stream_changes() -> None:
        nonlocal emitted
        while True:
            emitted += 1
            fake_upstream.insert("war_calls", call(FACTION, emitted))
            await trio.sleep(0.01)

    async def keep_polling(script: Userscript) -> None:
        while True:
            with contextlib.suppress(httpx.TransportError):  # as today's script: log and poll on
                await script.poll()
            await trio.sleep(0.02)

    with trio.fail_after(60):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_changes)
                nursery.start_soon(keep_polling, script)
                await eventually(lambda: len(script.events) >= 20)
                relay.process.kill()  # SIGKILL while changes stream in and the client polls
                await relay.process.wait()
                nursery.cancel_scope.cancel()
        seen = list(script.events)
        joins_before = fake_upstream.joins
        async with relay_process(config, env) as restarted, httpx.AsyncClient(base_url=restarted.url) as http:
            await fake_upstream.wait_until(lambda: fake_upstream.joins > joins_before)  # nobody re-subscribed
            await wait_connected(http, FACTION)
            served = (await http.get("/events", params={"faction_id": FACTION, "since": 0})).json()["events"]
            by_id = {event["id"]: event for event in served}
            assert [by_id.get(event["id"]) for event in seen] == seen  # same id, timestamp and data
            script.http = http  # the same member, now talking to the restarted relay
            fake_upstream.insert("war_calls", call(FACTION, 10_000))
            # Events committed before the kill that the client had not polled yet come first.
            await eventually_async(script.poll, lambda: script.events[-1]["data"]["new"]["id"] == 10_000)
            restarted.process.send_signal(signal.SIGTERM)
            assert await restarted.process.wait() == 0
    newest = script.events[-1]
    assert newest["data"]["new"]["id"] == 10_000
    assert newest["timestamp"] > max(event["timestamp"] for event in served)
    stamps = [event["timestamp"] for event in script.events]
    assert stamps == sorted(set(stamps))  # the client's view: strictly increasing across the crash
    call_ids = [event["data"]["new"]["id"] for event in script.events]
    assert call_ids == sorted(set(call_ids))  # nothing twice, nothing out of order
    with sqlite3.connect(config.parent / "data" / "relay.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.e2e
async def test_a_config_error_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[upstream]\nurl = "wss://example.supabase.co/realtime/v1/websocket"\n')
    result = await trio.run_process(
        [RELAY, "serve", "--config", str(config)], capture_stderr=True, check=False
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("relay: ")
    assert "anon_key" in lines[0]


@pytest.mark.e2e
async def test_a_port_in_use_is_one_line_and_exit_status_2(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        with trio.fail_after(30):
            result = await trio.run_process(
                [RELAY, "serve", "--config", str(config)], env=env, capture_stderr=True, check=False
            )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "Traceback" not in stderr, stderr
    assert "Exception" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"relay: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.e2e
async def test_an_old_key_name_is_served_with_one_warning_naming_the_new_one(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    config.write_text(config.read_text().replace("heartbeat_interval_s =", "heartbeat_interval ="))
    with trio.fail_after(30):
        async with relay_process(config, env) as relay:
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    warnings = [line for line in relay.log if "heartbeat_interval" in line]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0]
    assert "upstream.heartbeat_interval in" in warnings[0]
    assert "call it upstream.heartbeat_interval_s" in warnings[0]


@pytest.mark.e2e
@pytest.mark.parametrize("rate", ["0", "-1", "nan", "fast"])
async def test_a_demo_rate_that_is_not_above_zero_is_refused_before_it_starts(rate: str) -> None:
    result = await trio.run_process(
        [RELAY, "demo", "--port", "0", "--changes-per-s", rate], capture_stderr=True, check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr.decode()
    assert (
        result.stderr.decode()
        .strip()
        .splitlines()[-1]
        .startswith("relay demo: error: argument --changes-per-s")
    )


@pytest.mark.e2e
async def test_demo_serves_live_war_traffic_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [RELAY, "demo", "--port", "0", "--changes-per-s", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        with trio.fail_after(30):
            assert process.stdout is not None
            banner = b""
            while b"curl -s http" not in banner:
                banner += await process.stdout.receive_some()
            url = re.search(rb"CAT Relay demo: (http://\S+)", banner)
            assert url is not None
            async with httpx.AsyncClient(base_url=url.group(1).decode()) as http:
                events: list[Any] = []

                async def fetch() -> None:
                    events[:] = (await http.get("/events", params={"faction_id": 46666, "since": 0})).json()[
                        "events"
                    ]

                while not events:
                    await fetch()
                    await trio.sleep(0.05)
            assert {event["data"]["table"] for event in events} <= {"war_calls", "faction_messages", "wars"}
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@pytest.mark.e2e
async def test_keys_never_reach_the_log_even_at_debug_level_through_faults(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    wrong_key = "wrong-key-that-must-not-be-logged"
    with trio.fail_after(60):
        async with (
            relay_process(config, env, log_level="DEBUG") as relay,
            httpx.AsyncClient(base_url=relay.url) as http,
        ):
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            await http.post("/subscribe", json={"faction_id": FACTION, "api_key": wrong_key})
            await http.post(f"/hospital?apikey={wrong_key}", json={"faction_id": FACTION, "data": {}})
            await http.post(
                "/events",
                json={"faction_id": FACTION, "api_key": ANON_KEY, "type": "hospital_update", "data": {}},
            )
            fake_upstream.refuse_upgrades(401, "Failed to validate JWT signature")
            fake_upstream.drop_connections(None)  # reconnects meet the refused key: auth_failed
            await eventually(lambda: "auth_failed" in relay.text())
            fake_upstream.accept_upgrades()
            fake_upstream.drop_connections(1012)
            fake_upstream.insert("war_calls", call(FACTION, 1))
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    log = relay.text()
    assert "DEBUG   relay: configuration:" in log  # the run really was at debug level, config included
    for secret in (ANON_KEY, wrong_key):
        for form in (secret, urllib.parse.quote(secret), urllib.parse.quote_plus(secret)):
            assert form not in log


@pytest.mark.unit
def test_the_garbage_collector_is_tuned_for_many_held_requests() -> None:
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0  # what start-up loaded is never scanned again
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.unit
def test_the_readmes_operator_command_examples_are_commands_the_parser_takes() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    examples = [line.split("relay ", 1)[1] for line in readme.splitlines() if line.startswith("$ ")]
    assert {example.split()[0] for example in examples} == {"check-config", "status", "db"}
    for example in examples:
        build_parser().parse_args(example.split())  # exits (SystemExit) on anything it does not take
