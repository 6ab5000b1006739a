"""relay/static/client.js in a real headless Chromium, against the relay and the fake upstream.

The page (tests/browser_page.html) comes from a second HTTP server on another port, so the client's
requests to the relay are cross-origin, as from torn.com. It plays today's userscript through the
WebSocket look-alike and POSTs what it received to that server's /report, which the test waits on.
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
from tests.conftest import ANON_KEY, FACTION, eventually, require_program
from tests.test_end_to_end import call, wait_connected, wait_reconciled

CHROMIUM = Path("/usr/bin/chromium")
PAGE = Path(__file__).with_name("browser_page.html")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# What the page receives, in order: the reply to its heartbeat, the three upstream changes, then the two
# updates it publishes itself (the second only after it has seen the first come back).
EXPECTED = 6
KILL_WAIT_S = 5.0
REPORT_WAIT_S = 40.0  # under the test's fail_after, so a missing report fails with what the page said


@pytest.fixture
def chromium_binary() -> Path:
    return require_program(CHROMIUM, "chromium", "the browser tests")


@dataclass
class PageServer:
    """Serves the page and collects its reports; the newest report (by the page's `seq`) wins."""

    url: str = ""
    latest: dict[str, Any] = field(default_factory=dict)
    arrived: dict[str, trio.Event] = field(default_factory=dict)
    resume: bool = False  # what GET /resume tells a paused page

    def app(self) -> QuartTrio:
        app = QuartTrio(__name__)

        @app.get("/")
        async def page() -> Response:
            return Response(await trio.Path(PAGE).read_bytes(), content_type="text/html; charset=utf-8")

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
    assert report["problems"] == [f"socket error: {closed['reason']}"]  # onerror, then onclose
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
        await eventually(
            lambda: [row["id"] for row in relay.store.faction_state(FACTION).tables["war_calls"]] == [1, 3, 4]
        )
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
