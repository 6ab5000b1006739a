"""relay/static/client.js in a real headless Chromium, against the relay and the fake upstream.

The page (tests/helpers/browser_page.html) comes from a second HTTP server on another port, so the
client's requests to the relay are cross-origin, as from torn.com. It plays today's userscript through
the WebSocket look-alike and POSTs what it received to that server's /report, which the test waits on.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, call
from tests.helpers.programs import CHROMIUM_FLAGS
from tests.helpers.relay_process import relay_process
from tests.helpers.userscript import wait_connected, wait_reconciled
from tests.helpers.waits import eventually_holds

pytestmark = pytest.mark.external

PAGE = Path(__file__).parent / "helpers" / "browser_page.html"
USERSCRIPT_PAGE = Path(__file__).parent / "helpers" / "userscript_page.html"
# What the page receives, in order: the reply to its heartbeat, the three upstream changes, then the two
# updates it publishes itself (the second only after it has seen the first come back).
EXPECTED = 6
KILL_WAIT_S = 5.0
REPORT_WAIT_S = 40.0  # under the test's fail_after, so a missing report fails with what the page said


@dataclass
class PageServer:
    """Serves the page and collects its reports; the newest report (by the page's `seq`) wins."""

    url: str = ""
    page: Path = PAGE
    latest: dict[str, Any] = field(default_factory=dict)
    arrived: dict[str, trio.Event] = field(default_factory=dict)
    resume: bool = False  # what GET /resume tells a paused page

    def app(self) -> QuartTrio:
        app = QuartTrio(__name__)

        @app.get("/")
        async def page() -> Response:
            return Response(await trio.Path(self.page).read_bytes(), content_type="text/html; charset=utf-8")

        @app.get("/resume")
        async def resume() -> Response:
            return Response(json.dumps(self.resume), content_type="application/json")

        @app.post("/report")
        async def report() -> Response:
            body = json.loads(await request.get_data(as_text=True))
            if body["seq"] > self.latest.get("seq", 0):
                self.latest = body
            self.event(body["kind"]).set()
            return Response("", status=204)

        return app

    def event(self, kind: str) -> trio.Event:
        return self.arrived.setdefault(kind, trio.Event())

    async def wait_for(self, kind: str, chromium: Chromium) -> dict[str, Any]:
        with trio.move_on_after(REPORT_WAIT_S):
            await self.event(kind).wait()
            return self.latest
        raise AssertionError(
            f"the page never reported {kind!r}; its last report: {self.latest}\n"
            f"Chromium said:\n{await chromium.output()}"
        )


@pytest.fixture
async def page_server(nursery: trio.Nursery) -> AsyncIterator[PageServer]:
    server = PageServer()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    stopping = trio.Event()
    (server.url,) = await nursery.start(
        functools.partial(serve, server.app(), config, shutdown_trigger=stopping.wait)
    )
    yield server
    stopping.set()


class Chromium:
    """Headless Chromium processes, each in a session of its own so that killing it takes its renderers."""

    def __init__(self, binary: Path, profile: Path, log: Path) -> None:
        self.binary = binary
        self.profile = profile
        self.log = log
        self.processes: list[trio.Process] = []

    async def open(self, url: str) -> None:
        with self.log.open("ab") as output:
            process = await trio.lowlevel.open_process(
                [str(self.binary), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        self.processes.append(process)

    async def kill(self) -> None:
        for process in self.processes:
            with trio.move_on_after(KILL_WAIT_S, shield=True):
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()

    async def output(self) -> str:
        return (await trio.Path(self.log).read_text(errors="replace"))[-2000:]


@pytest.fixture
async def chromium(chromium_binary: Path, tmp_path: Path) -> AsyncIterator[Chromium]:
    browser = Chromium(chromium_binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield browser
    finally:
        await browser.kill()


@pytest.mark.parametrize(
    ("page", "transport"),
    [
        pytest.param({"sse": "on"}, "sse", id="sse"),
        pytest.param({"sse": "off"}, "long-poll", id="no-event-source"),
        pytest.param({"request": "gm"}, "long-poll", id="gm-xmlhttprequest"),
        pytest.param({"request": "flaky"}, "poll", id="held-requests-dropped"),
    ],
)
async def test_the_browser_client_delivers_everything_once_in_order(
    chromium_binary: Path,  # first, so that a skip comes before the relay starts
    relay: RunningRelay,
    fake_upstream: FakeSupabase,
    page_server: PageServer,
    chromium: Chromium,
    page: dict[str, str],
    transport: str,
) -> None:
    # FULL: the DELETE then comes on the faction's own channel, after the UPDATE. Under DEFAULT it comes
    # on the shared socket and may overtake the UPDATE, which is then dropped as superseded.
    fake_upstream.define_table("war_calls", replica_identity="full")
    query = urllib.parse.urlencode(
        {"relay": relay.url, "faction": FACTION, "key": ANON_KEY, "expect": EXPECTED, **page}
    )
    with trio.fail_after(60):
        await chromium.open(f"{page_server.url}/?{query}")
        opened = await page_server.wait_for("open", chromium)
        assert opened["problems"] == []
        async with httpx.AsyncClient(base_url=relay.url) as http:
            await wait_connected(http, FACTION)
        fake_upstream.insert("war_calls", call(FACTION, 1))
        fake_upstream.update("war_calls", 1, {"caller_id": 1_002, "caller_name": "bob"})
        fake_upstream.delete("war_calls", 1)
        done = await page_server.wait_for("done", chromium)

    assert done["problems"] == []
    if transport == "poll":  # each held request failed, up to the fallback
        assert len(done["client_errors"]) == 3
        assert all("wait=25 failed" in error for error in done["client_errors"])
    else:
        assert done["client_errors"] == []
    assert done["has_event_source"] is (page.get("sse") != "off")
    received = done["received"]
    # From the first upstream change on; the heartbeat's reply may come before a fallback settles.
    assert [item["transport"] for item in received[1:]] == [transport] * (EXPECTED - 1)
    assert [item["kind"] for item in received] == ["message"] * 4 + [
        "hospital_update",
        "faction_members_update",
    ]
    reply, *changes = [item["data"] for item in received[:4]]
    assert reply == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "1",
    }
    assert [item["counted"] for item in received[:4]] == [0, 1, 2, 3]  # the second listener saw each one
    assert [change["event"] for change in changes] == ["postgres_changes"] * 3
    payloads = [change["payload"] for change in changes]
    assert [p["eventType"] for p in payloads] == ["INSERT", "UPDATE", "DELETE"]
    assert payloads[0]["new"] == call(FACTION, 1)
    assert payloads[1]["new"]["caller_name"] == "bob"
    assert payloads[2]["old"]["target_id"] == call(FACTION, 1)["target_id"]
    assert received[4]["data"] == {"members": [{"id": 7, "until": 1764000000}]}
    assert received[5]["data"] == [{"id": 7, "name": "alice"}]


async def test_a_refused_key_errors_and_closes_the_connection_as_a_websocket_would(
    chromium_binary: Path, relay: RunningRelay, page_server: PageServer, chromium: Chromium
) -> None:
    query = urllib.parse.urlencode(
        {"relay": relay.url, "faction": FACTION, "key": "not-the-key", "expect": EXPECTED}
    )
    with trio.fail_after(60):
        await chromium.open(f"{page_server.url}/?{query}")
        report = await page_server.wait_for("closed", chromium)
    closed = report["closed"]
    assert (closed["code"], closed["was_clean"], closed["ready_state"]) == (1006, False, 3)
    assert closed["reason"].startswith("the relay is unavailable: 401 invalid_api_key")
    # onerror, then the page's fatal-error listener on the same object, then onclose
    assert report["problems"] == [f"socket error: {closed['reason']}", closed["reason"]]
    assert report["received"] == []


async def test_a_client_that_missed_more_than_the_relay_keeps_recovers_from_state(
    chromium_binary: Path,
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    fake_upstream: FakeSupabase,
    page_server: PageServer,
    chromium: Chromium,
) -> None:
    relay: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[retention]\nevents_per_faction = 2\n"))
    )
    query = urllib.parse.urlencode(
        {"relay": relay.url, "faction": FACTION, "key": ANON_KEY, "expect": 6, "gap": 1}
    )
    with trio.fail_after(60):
        await chromium.open(f"{page_server.url}/?{query}")
        await page_server.wait_for("open", chromium)
        async with httpx.AsyncClient(base_url=relay.url) as http:
            await wait_reconciled(http, FACTION)  # so that calls 1 and 2 arrive live, not as resyncs
        fake_upstream.insert("war_calls", call(FACTION, 1))
        fake_upstream.insert("war_calls", call(FACTION, 2))
        await page_server.wait_for("paused", chromium)
        # While the tab sleeps: four changes, two more than the relay keeps per faction.
        fake_upstream.update("war_calls", 1, {"caller_name": "bob"})
        fake_upstream.delete("war_calls", 2)
        fake_upstream.insert("war_calls", call(FACTION, 3))
        fake_upstream.insert("war_calls", call(FACTION, 4))

        async def rows_are_1_3_4() -> bool:
            state = await relay.store.faction_state(FACTION)
            return [row["id"] for row in state.tables["war_calls"]] == [1, 3, 4]

        await eventually_holds(rows_are_1_3_4)
        page_server.resume = True
        done = await page_server.wait_for("done", chromium)
    assert done["problems"] == []
    payloads = [item["data"]["payload"] for item in done["received"]]
    summary = [
        (p["eventType"], (p["old"] if p["eventType"] == "DELETE" else p["new"])["id"], p.get("resync", False))
        for p in payloads
    ]
    assert summary == [
        ("INSERT", 1, False),
        ("INSERT", 2, False),
        ("UPDATE", 1, True),
        ("DELETE", 2, True),
        ("INSERT", 3, True),
        ("INSERT", 4, True),
    ]
    assert payloads[2]["new"]["caller_name"] == "bob"
    assert payloads[3]["old"] == call(FACTION, 2)  # the whole row, as today's script needs


WAR = 77  # call(...) rows are in war 77
OTHER_WAR = 88


def war(war_id: int, **changes: Any) -> dict[str, Any]:
    return {"id": war_id, "war_id": war_id, "faction_id": FACTION, "is_active": True, **changes}


@pytest.mark.parametrize("option", ["a", "b"])
@pytest.mark.parametrize(("request_function", "transport"), [("", "sse"), ("gm", "long-poll")])
async def test_todays_userscript_connection_code_gets_its_joins_through_a_relay_restart(
    chromium_binary: Path,
    serve_config: tuple[Path, dict[str, str]],
    fake_upstream: FakeSupabase,
    page_server: PageServer,
    chromium: Chromium,
    option: str,
    request_function: str,
    transport: str,
) -> None:
    """tests/helpers/userscript_page.html runs the real script's RealtimeManager call shape (Option A or B of
    docs/client.md) against `relay serve`, which is stopped with SIGTERM and started again meanwhile."""
    config, env = serve_config
    page_server.page = USERSCRIPT_PAGE
    fake_upstream.define_table("war_calls", replica_identity="full")  # the DELETE after the UPDATE
    # Each table FULL or never deleted from, so no relay-wide DELETE socket: its going live after the
    # faction's first reconcile asks for another, whose resync events may land amid the order this
    # test asserts (the shared socket has tests of its own).
    config.write_text(
        config.read_text()
        + "".join(
            f'[[upstream.channels]]\ntable = "{table}"\nfilter = "faction_id=eq.{{faction_id}}"\n'
            'deletes = "filtered"\n'
            for table in ("war_calls", "faction_messages", "wars")
        )
    )
    with trio.fail_after(90):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            query = urllib.parse.urlencode(
                {"relay": relay.url, "faction": FACTION, "key": ANON_KEY, "war": WAR}
                | {"option": option, "request": request_function}
            )
            await chromium.open(f"{page_server.url}/?{query}")
            opened = await page_server.wait_for("open:1", chromium)
            await wait_reconciled(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 1))
            fake_upstream.insert("war_calls", {**call(FACTION, 2), "war_id": OTHER_WAR})  # not joined
            fake_upstream.update("war_calls", 1, {"caller_id": 1_002, "caller_name": "bob"})
            fake_upstream.delete("war_calls", 1)
            fake_upstream.insert("wars", war(OTHER_WAR))  # not joined
            fake_upstream.insert("wars", war(WAR))
            fake_upstream.update("wars", WAR, {"is_active": False})
            fake_upstream.insert("faction_messages", {"id": 5, "faction_id": FACTION, "message": "hi"})
            before = await page_server.wait_for("received:6", chromium)
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.process.wait() == 0
            closed = await page_server.wait_for("closed:1", chromium)
            port = relay.url.rsplit(":", 1)[1]
        fake_upstream.insert("war_calls", call(FACTION, 3))  # while the relay is down
        async with relay_process(config, {**env, "RELAY_SERVER_PORT": port}) as restarted:
            reopened = await page_server.wait_for("open:2", chromium)
            await page_server.wait_for("received:7", chromium)  # call 3, from the restarted relay's reconcile
            fake_upstream.insert("war_calls", call(FACTION, 4))
            done = await page_server.wait_for("received:8", chromium)
            restarted.process.send_signal(signal.SIGTERM)
            assert await restarted.process.wait() == 0

    assert opened["default_relay"] == relay.url  # /client.js knows the relay it came from
    assert done["problems"] == []
    topics = {
        "war_calls": f"realtime:public:war_calls:war_id=eq.{WAR}",
        "wars": f"realtime:public:wars:id=eq.{WAR}",
        "faction_messages": f"realtime:public:faction_messages:faction_id=eq.{FACTION}",
    }
    assert sorted((r["topic"], r["status"]) for r in before["replies"]) == sorted(
        [(topic, "ok") for topic in topics.values()] + [("realtime:public:target_calls", "error")]
    )
    assert "does not carry table target_calls" in next(
        r["reason"] for r in before["replies"] if r.get("reason")
    )
    summary = [(r["table"], r["eventType"], r["id"]) for r in done["received"]]
    assert summary == [
        ("war_calls", "INSERT", 1),
        ("war_calls", "UPDATE", 1),
        ("war_calls", "DELETE", 1),
        ("wars", "INSERT", WAR),
        ("wars", "UPDATE", WAR),
        ("faction_messages", "INSERT", 5),
        ("war_calls", "INSERT", 3),
        ("war_calls", "INSERT", 4),
    ]
    assert all(r["topic"] == topics[r["table"]] for r in done["received"])
    assert done["received"][5]["notified"] == "New message: hi"
    assert done["warEnded"] == 1
    # The restart: seen as a closed socket, reopened by the script's first reconnect, never near its limit.
    assert (closed["is_connected"], closed["ready_state"]) == (False, 3)
    assert (reopened["opens"], reopened["closes"], reopened["maxAttempts"]) == (2, 1, 1)
    assert (done["is_connected"], done["ready_state"]) == (True, 1)
    # Delivery came back on the best transport, not a fallback.
    assert done["received"][-1]["transport"] == transport
