"""Logs: one line per record, human or JSON as `[logging]` says, one line per state change, no key."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from relay.config import LoggingConfig
from relay.logs import JsonFormatter, configure_logging
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.relay_process import relay_process
from tests.helpers.userscript import Userscript, wait_connected
from tests.helpers.waits import eventually

TRANSITION = re.compile(rf"^FactionSupervisor\({FACTION}\): (\w+) -> (\w+)")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    touched = ["trio-websocket", "relay.storage.store", "hypercorn.error", "httpx", "httpcore"]
    levels = {name: logging.getLogger(name).level for name in touched}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.e2e
async def test_json_logs_are_one_object_per_line_with_one_line_per_state_change(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    config.write_text(config.read_text() + '[logging]\nformat = "json"\n')
    with trio.fail_after(30):
        async with (
            relay_process(config, env, log_level="DEBUG") as relay,
            httpx.AsyncClient(base_url=relay.url) as http,
        ):
            await Userscript(http, FACTION).start()
            await wait_connected(http, FACTION)
            fake_upstream.drop_connections(1012)  # a restart upstream: the faction reconnects
            await eventually(
                lambda: relay.text().count(f"FactionSupervisor({FACTION}): connecting -> connected") == 2
            )
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
    entries = [json.loads(line) for line in relay.log if line]  # each line alone is one JSON object
    assert all(set(entry) >= {"time", "level", "logger", "message"} for entry in entries)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]) for entry in entries)
    assert {"DEBUG", "INFO"} <= {entry["level"] for entry in entries}
    transitions = [found.groups() for entry in entries if (found := TRANSITION.search(entry["message"]))]
    # Each change of the faction's upstream state is one line, and the same change is not repeated.
    assert transitions[0] == ("connecting", "connected")
    assert ("connected", "backoff") in transitions or ("connected", "connecting") in transitions
    assert transitions[-2:] == [("connecting", "connected"), ("connected", "stopped")]  # then SIGTERM
    assert all(a != b for a, b in itertools.pairwise(transitions))
    assert ANON_KEY not in relay.text()


@pytest.mark.unit
def test_the_json_formatter_keeps_a_traceback_inside_its_one_line() -> None:
    try:
        raise ValueError("bad frame")
    except ValueError:
        record = logging.LogRecord("relay.x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        record.exc_info = __import__("sys").exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "relay.x", "failed here")
    assert "ValueError: bad frame" in entry["exception"]


@pytest.mark.unit
@pytest.mark.usefixtures("restore_logging")
def test_levels_per_logger_apply_and_trio_websocket_never_goes_below_info() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig("human", "DEBUG", (("relay.storage.store", "WARNING"),)), stream=stream)
    logging.getLogger("relay.storage.store").info("not shown")
    logging.getLogger("relay.storage.store").warning("shown")
    logging.getLogger("relay.upstream.supervisor").debug("debug shown")
    logging.getLogger("trio-websocket").debug("ws://upstream/?apikey=secret")
    logging.getLogger("httpx").info("HTTP Request: GET https://x.supabase.co/rest/v1/war_calls")
    text = stream.getvalue()
    assert "not shown" not in text
    assert "WARNING relay.storage.store: shown" in text
    assert "debug shown" in text
    assert "apikey" not in text
    assert "HTTP Request" not in text  # a reconcile's every read is not a state change


@pytest.mark.unit
@pytest.mark.usefixtures("restore_logging")
def test_the_command_line_level_wins_over_the_config() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig("json", "WARNING"), level="INFO", stream=stream)
    logging.getLogger("relay.test").info("hello")
    assert json.loads(stream.getvalue())["message"] == "hello"
