"""`relay status`: the table built from /status, and its exit statuses against a real relay with one
faction connected and one refused by the fake upstream."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay.config import load_config
from relay.ops.statustable import Unreachable, exit_status, render, url_from_config
from relay.service import RunningRelay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, OTHER_FACTION
from tests.helpers.operator_commands import run_relay_command
from tests.helpers.userscript import Userscript, wait_connected

NOW_MS = 1_732_460_000_000


def faction(faction_id: int, state: str, **fields: Any) -> dict[str, Any]:
    upstream = {
        "state": state,
        "attempts": fields.pop("attempts", 0),
        "last_error": fields.pop("last_error", None),
    }
    return {
        "faction_id": faction_id,
        "upstream": {**upstream, "connected_since": None, "next_attempt_in_s": None},
        "events_stored": 0,
        "last_event_at": None,
        "last_poll_at": None,
        **fields,
    }


def document(*factions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "online": True,
        "timestamp": NOW_MS,
        "version": "1.2.3",
        "uptime_s": 3 * 3600 + 5,
        "factions": list(factions),
        **fields,
    }


def rows(shown: str) -> list[list[str]]:
    """The table's cells, split on the two-space gaps between columns."""
    table = shown.split("\n\n", 1)[1]
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in table.splitlines()]


@pytest.mark.unit
def test_ages_are_measured_against_the_relays_own_clock_when_it_sends_one() -> None:
    status = document(
        faction(
            FACTION,
            "connected",
            events_stored=37,
            last_event_at=NOW_MS - 12_000,
            last_poll_at=NOW_MS - 4 * 60_000,
            members=41,
            events_per_minute=[0] * 28 + [3, 4],
        ),
        faction(
            OTHER_FACTION,
            "auth_failed",
            attempts=7,
            last_error="HandshakeRefused: HTTP 401 Failed to validate JWT signature, and a long tail",
            last_event_at=NOW_MS - 3 * 3600_000 - 59_000,
            members=0,
            events_per_minute=[0] * 30,
        ),
        now=NOW_MS,
    )
    shown = render(status, "http://127.0.0.1:8444", now_ms=NOW_MS + 86_400_000)  # a local clock a day off
    assert (
        shown.splitlines()[0]
        == "relay 1.2.3 at http://127.0.0.1:8444: up 3h, 2 factions (2 active), 1 connected"
    )
    assert rows(shown) == [
        [
            "FACTION",
            "UPSTREAM",
            "ATTEMPTS",
            "MEMBERS",
            "STORED",
            "LAST 30M",
            "LAST EVENT",
            "LAST POLL",
            "LAST ERROR",
        ],
        [str(FACTION), "connected", "0", "41", "37", "7", "12s", "4m", "-"],
        [
            str(OTHER_FACTION),
            "auth_failed",
            "7",
            "0",
            "0",
            "0",
            "3h",
            "-",
            "HandshakeRefused: HTTP 401 Failed to validate JWT signature…",
        ],
    ]


@pytest.mark.unit
def test_without_members_or_now_the_columns_are_left_out_and_the_local_clock_is_used() -> None:
    status = document(faction(FACTION, "backoff", last_event_at=NOW_MS - 90_000, last_poll_at=NOW_MS + 500))
    shown = render(status, "http://relay", now_ms=NOW_MS)
    assert rows(shown) == [
        ["FACTION", "UPSTREAM", "ATTEMPTS", "STORED", "LAST EVENT", "LAST POLL", "LAST ERROR"],
        [str(FACTION), "backoff", "0", "0", "1m", "0s", "-"],  # a poll stamped by a clock a little ahead
    ]
    assert "\x1b" not in shown  # no colour, ever


@pytest.mark.unit
def test_no_factions_is_a_summary_line_only() -> None:
    assert render(document(), "http://relay", now_ms=NOW_MS) == (
        "relay 1.2.3 at http://relay: up 3h, 0 factions (0 active), 0 connected"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("states", "status"),
    [
        ([], 0),
        (["connected", "connected"], 0),
        (["connected", "stopped"], 0),  # an expired faction is not expected to be connected
        (["connected", "connecting"], 1),
        (["backoff"], 1),
        (["auth_failed", "stopped"], 1),
    ],
)
def test_the_exit_status_says_whether_every_active_faction_is_connected(
    states: list[str], status: int
) -> None:
    assert exit_status(document(*(faction(n, state) for n, state in enumerate(states, 1)))) == status


@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8444, "http://127.0.0.1:8444"),
        ("0.0.0.0", 9000, "http://127.0.0.1:9000"),
        ("::", 8444, "http://[::1]:8444"),
        ("relay.lan", 80, "http://relay.lan:80"),
    ],
)
def test_the_url_from_a_config_reaches_the_relay_from_its_own_machine(
    tmp_path: Path, host: str, port: int, url: str
) -> None:
    (tmp_path / "relay.toml").write_text(
        f'[server]\nhost = "{host}"\nport = {port}\n[upstream]\nurl = "ws://x.invalid"\n'
    )
    config = load_config(tmp_path / "relay.toml", environ={"RELAY_UPSTREAM_ANON_KEY": "key"})
    assert url_from_config(config) == url


@pytest.mark.unit
def test_a_config_with_port_0_cannot_say_where_the_relay_is(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text('[server]\nport = 0\n[upstream]\nurl = "ws://x.invalid"\n')
    config = load_config(tmp_path / "relay.toml", environ={"RELAY_UPSTREAM_ANON_KEY": "key"})
    with pytest.raises(Unreachable, match="pass --url"):
        url_from_config(config)


@pytest.mark.e2e
async def test_a_real_relay_with_one_faction_connected_and_one_refused(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            for faction_id in (FACTION, OTHER_FACTION):
                await Userscript(http, faction_id).start()
                await wait_connected(http, faction_id)
            healthy = await run_relay_command("status", "--url", relay.url)

            # The key is refused from now on; only the other faction's socket is dropped, so only it meets that.
            fake_upstream.refuse_upgrades(401, "Failed to validate JWT signature")
            fake_upstream.drop_connections(None, only=fake_upstream.connections_with(f"eq.{OTHER_FACTION}"))

            await wait_refused(http)
            faulted = await run_relay_command("status", "--url", relay.url)
    assert (healthy.status, healthy.err) == (0, "")
    assert ", 2 factions (2 active), 2 connected" in healthy.out.splitlines()[0]
    assert (faulted.status, faulted.err) == (1, "")
    assert ", 2 factions (2 active), 1 connected" in faulted.out.splitlines()[0]
    by_faction = {row[0]: row for row in rows(faulted.out)[1:]}
    assert by_faction[str(FACTION)][1:3] == ["connected", "0"]
    assert by_faction[str(FACTION)][-1] == "-"
    assert by_faction[str(OTHER_FACTION)][1] in {"auth_failed", "connecting"}  # between tries, or in one
    assert "HTTP 401" in by_faction[str(OTHER_FACTION)][-1]


async def wait_refused(http: httpx.AsyncClient) -> None:
    while True:
        factions = {f["faction_id"]: f for f in (await http.get("/status")).json()["factions"]}
        if "HTTP 401" in (factions[OTHER_FACTION]["upstream"]["last_error"] or ""):
            return
        await trio.sleep(0.05)


@pytest.mark.e2e
async def test_a_relay_that_does_not_answer_is_one_line_and_exit_status_2() -> None:
    with socket.socket() as closed:  # a port nothing listens on once this socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    ran = await run_relay_command("status", "--url", f"http://127.0.0.1:{port}")
    assert (ran.status, ran.out) == (2, "")
    assert len(ran.error_lines) == 1
    assert ran.error_lines[0].startswith(f"relay: cannot reach the relay at http://127.0.0.1:{port}/status: ")


@pytest.mark.e2e
async def test_something_else_answering_is_not_taken_for_a_relay(relay: RunningRelay) -> None:
    ran = await run_relay_command("status", "--url", relay.url + "/ping")  # JSON, but not /status
    assert ran.status == 2
    assert ran.error_lines == [f"relay: {relay.url}/ping/status answered 404, not a relay's status"]


@pytest.mark.e2e
async def test_the_help_says_what_each_exit_status_means() -> None:
    ran = await run_relay_command("status", "--help")
    assert ran.status == 0
    assert "0 when every active (not expired) faction is connected, 1 when one is not" in " ".join(
        ran.out.split()
    )
    assert "2 when the relay cannot be reached" in " ".join(ran.out.split())
