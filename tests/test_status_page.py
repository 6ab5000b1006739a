"""The status page at `/` in a real headless Chromium, against a relay with a live and a faulted faction.

Chromium is driven over the DevTools protocol (its own WebSocket, spoken here with trio-websocket), so
that the test can wait for the page's own renders (it counts them in `data-renders`), read what a
person sees (`innerText`), list every request the page made, and take a screenshot.

`python -m tests.test_status_page --screenshot docs/status-page.png` rewrites the README's screenshot.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

import relay
from relay.config import Config, load_config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION, call
from tests.helpers.programs import CHROMIUM, CHROMIUM_FLAGS
from tests.helpers.waits import eventually_async

# The faulted faction has the larger id, so that it coming first shows the page's order by state.
LIVE, FAULTED = OTHER_FACTION, FACTION
# A refused key stays `auth_failed` until its retry, drawn between half and all of `backoff_max_s`: at
# 120 s, the faulted faction keeps its state (and the page its "retry in N s") for the whole test.
SCENE_BACKOFF_MAX_S = 120.0
LIVE_CHANGES = 3
# Markup where upstream's words go: the page must show it as text, never make it an element.
HOSTILE_REFUSAL = '<img src="/pwned" onerror="alert(1)">Failed to validate JWT signature'
PLAIN_REFUSAL = "Failed to validate JWT signature"
DEVTOOLS_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")
DEVTOOLS_MESSAGE_BYTES = 32 * 1024 * 1024  # a screenshot arrives as one base64 message
STDERR_KEPT_BYTES = 8192
KILL_WAIT_S = 5.0
RENDER_WAIT_S = 20.0  # under the tests' fail_after, so that a page that never renders says why
WIDE = (1100, 600)
PHONE = (390, 844)
# The README's screenshot is taken this long after the calls, so that its ages read like a running relay's.
SCREENSHOT_AFTER_S = 12.0

# Resolves once the page has rendered `n` times (it counts successful and failed refreshes alike).
WAIT_FOR_RENDERS = """(n) => new Promise((resolve) => {
  const done = () => Number(document.body.dataset.renders) >= n;
  if (done()) { resolve(true); return; }
  const observer = new MutationObserver(() => { if (done()) { observer.disconnect(); resolve(true); } });
  observer.observe(document.body, { attributes: true, attributeFilter: ["data-renders"] });
})"""
# What a person sees: the visible text of the header tiles, the banner and each row's cells.
READ_PAGE = """(() => {
  const text = (node) => (node ? node.innerText.trim() : null);
  const shown = (node) => node !== null && node.getClientRects().length > 0;
  const banner = document.getElementById("banner");
  return {
    renders: Number(document.body.dataset.renders),
    title: document.title,
    stale: document.body.classList.contains("stale"),
    banner: shown(banner) ? text(banner) : null,
    tiles: Object.fromEntries([...document.querySelectorAll(".tile")].map(
      (tile) => [text(tile.querySelector("dt")), text(tile.querySelector("dd"))])),
    headings: [...document.querySelectorAll("thead th")].filter(shown).map(text),
    elements: [...document.querySelectorAll("img, iframe, object, embed, link, script[src]")].length,
    rows: [...document.querySelectorAll("tbody tr")].map((tr) => ({
      faction: Number(tr.dataset.faction),
      cells: Object.fromEntries([...tr.cells].map((td) => [td.dataset.label, text(td)])),
      labels: [...tr.cells].map((td) => getComputedStyle(td, "::before").content),
      sparklines: [...tr.querySelectorAll("svg")].map((svg) => ({
        values: svg.getAttribute("data-values"),
        line: svg.querySelector("path.line").getAttribute("d"),
      })),
    })),
  };
})()"""


class DevToolsError(Exception):
    pass


@dataclass
class DevTools:
    """One DevTools socket attached to one page; events are kept in arrival order."""

    ws: WebSocketConnection
    session: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self.ws.send_message(json.dumps(message))
        while True:
            answer = json.loads(await self.ws.get_message())
            if answer.get("id") == message_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result
            self.events.append(answer)

    async def wait_event(self, method: str, after: int) -> dict[str, Any]:
        """The first `method` event from index `after` of `events` on, waiting for it if need be."""
        while True:
            for event in self.events[after:]:
                if event.get("method") == method:
                    return event
            after = len(self.events)
            self.events.append(json.loads(await self.ws.get_message()))

    async def evaluate(self, expression: str) -> Any:
        answer = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in answer:
            raise DevToolsError(f"the page threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def open(self, url: str) -> None:
        seen = len(self.events)
        await self.call("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired", seen)

    async def rendered(self, count: int) -> dict[str, Any]:
        """What the page shows once it has rendered `count` times."""
        with trio.move_on_after(RENDER_WAIT_S):
            await self.evaluate(f"({WAIT_FOR_RENDERS})({count})")
            page: dict[str, Any] = await self.evaluate(READ_PAGE)
            return page
        raise AssertionError(f"the page never rendered {count} times; it met {self.problems()}")

    async def resize(self, width: int, height: int, *, mobile: bool = False) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )

    async def screenshot(self, path: Path, width: int, *, mobile: bool = False) -> None:
        """A PNG of the whole page at `width` pixels, as tall as its content."""
        await self.resize(width, WIDE[1], mobile=mobile)
        height = await self.evaluate("Math.ceil(document.body.getBoundingClientRect().bottom)")
        await self.resize(width, int(height), mobile=mobile)
        shot = await self.call("Page.captureScreenshot", format="png")
        await trio.Path(path).write_bytes(base64.b64decode(shot["data"]))

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def problems(self) -> list[str]:
        """Uncaught exceptions and console errors (a refused CSP hash, say) the page has met."""
        found = []
        for event in self.events:
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(str(event["params"]["exceptionDetails"]))
            elif event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                found.append(event["params"]["entry"]["text"])
            elif event.get("method") == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                found.append(str(event["params"]["args"]))
        return found


@dataclass
class HeadlessChromium:
    """Chromium with its DevTools socket on a free port, in a session of its own so killing it takes
    its renderers. `run` reports the socket's URL, which Chromium prints on stderr once it listens."""

    binary: Path
    profile: Path
    stderr: bytearray = field(default_factory=bytearray)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        process = await trio.lowlevel.open_process(
            [
                str(self.binary),
                *CHROMIUM_FLAGS,
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert process.stderr is not None
            # Reading on to the end also keeps Chromium from blocking on a full stderr pipe.
            started = False
            async for chunk in process.stderr:
                self.stderr = (self.stderr + chunk)[-STDERR_KEPT_BYTES:]
                listening = DEVTOOLS_LISTENING.search(self.stderr)
                if not started and listening:
                    started = True
                    task_status.started(listening.group(1).decode())
            if not started:
                raise AssertionError(
                    f"Chromium ended without a DevTools socket:\n{self.stderr.decode(errors='replace')}"
                )
        finally:
            with trio.move_on_after(KILL_WAIT_S, shield=True):
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


@asynccontextmanager
async def open_page(devtools_url: str) -> AsyncIterator[DevTools]:
    """A new tab, with its network requests, console and exceptions recorded from the start."""
    async with open_websocket_url(devtools_url, max_message_size=DEVTOOLS_MESSAGE_BYTES) as ws:
        devtools = DevTools(ws)
        target = await devtools.call("Target.createTarget", url="about:blank")
        attached = await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        devtools.session = attached["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            await devtools.call(f"{domain}.enable")
        await devtools.resize(*WIDE)
        yield devtools


# --- the scene: a relay with one live faction and one whose key upstream refuses ---------------------


def scene_config(directory: Path, upstream_url: str) -> Config:
    config_file = directory / "relay.toml"
    config_file.write_text(
        "[upstream]\nheartbeat_interval_s = 2.0\nconnect_timeout_s = 2.0\nbackoff_initial_s = 0.05\n"
        f"backoff_max_s = {SCENE_BACKOFF_MAX_S}\n"
        # The test watches /status (10 tokens a request) from the page's own address: without this the
        # page meets 429s of the test's making. The limit is test_ratelimit.py's to test.
        "[limits]\nclient_rate = 0\n"
    )
    overrides = {
        "RELAY_UPSTREAM_URL": upstream_url,
        "RELAY_UPSTREAM_ANON_KEY": ANON_KEY,
        "RELAY_SERVER_PORT": "0",
        "RELAY_STORAGE_PATH": str(directory / "data" / "relay.db"),
    }
    return load_config(config_file, environ={}, overrides=overrides)


@dataclass
class StatusWatch:
    http: httpx.AsyncClient
    latest: dict[str, Any] = field(default_factory=dict)

    async def until(self, condition: Callable[[dict[int, Any], dict[str, Any]], object]) -> dict[str, Any]:
        """Ask `/status` until `condition(faction_id -> faction, document)` holds; callers bound it."""

        async def look() -> None:
            self.latest = (await self.http.get("/status")).json()

        def holds() -> bool:
            factions = {f["faction_id"]: f for f in self.latest["factions"]}
            return bool(condition(factions, self.latest))

        await eventually_async(look, holds)
        return self.latest


async def subscribe(http: httpx.AsyncClient, faction_id: int) -> None:
    answer = await http.post("/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY})
    assert answer.json()["status"] == "subscribed"


async def set_the_scene(http: httpx.AsyncClient, fake: FakeSupabase, refusal: str) -> StatusWatch:
    """LIVE connected with LIVE_CHANGES war calls and one member polling; FAULTED with its key refused."""
    watch = StatusWatch(http)
    await subscribe(http, LIVE)
    # Reconciled first, so the calls arrive live; the shared DELETE socket up before upgrades are refused.
    await watch.until(
        lambda factions, status: (
            LIVE in factions
            and factions[LIVE]["reconcile"]["reconciles"] >= 1
            and (status["shared_deletes"] or {}).get("state") == "connected"
        )
    )
    fake.refuse_upgrades(401, refusal)  # every upgrade from now on: only FAULTED's will come
    await subscribe(http, FAULTED)
    for call_id in range(1, LIVE_CHANGES + 1):
        fake.insert("war_calls", call(LIVE, call_id))
    await watch.until(
        lambda factions, status: (
            factions[FAULTED]["upstream"]["state"] == "auth_failed"
            and factions[LIVE]["events_stored"] == LIVE_CHANGES
        )
    )
    # A member polling LIVE, as today's script does.
    assert (await http.get("/events", params={"faction_id": LIVE, "since": 0})).status_code == 200
    return watch


# --- tests -----------------------------------------------------------------------------------------


def sparkline_heights(line: str) -> list[float]:
    return [float(y) for y in re.findall(r"[ML][\d.]+ ([\d.]+)", line)]


@pytest.mark.e2e
async def test_the_page_is_one_file_that_may_load_nothing_but_itself(relay: RunningRelay) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            answer = await http.get("/")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    html = answer.text
    # No absolute or protocol-relative reference: fonts, scripts and images would come from elsewhere.
    assert re.findall(r"[a-z]+://|[\"'(=]\s*//|@import", html, re.IGNORECASE) == []
    assert re.findall(r"<(?:link|img|iframe|object|embed)\b|<script\s+src", html, re.IGNORECASE) == []
    policy = dict(
        directive.strip().split(" ", 1) for directive in answer.headers["content-security-policy"].split(";")
    )

    def digest(tag: str) -> str:
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        return f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"

    assert policy == {
        "default-src": "'none'",
        "script-src": digest("script"),
        "style-src": digest("style"),
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }


@dataclass
class Scene:
    relay: RunningRelay
    fake: FakeSupabase
    watch: StatusWatch
    page: DevTools
    relay_ended: trio.Event


@pytest.fixture
async def scene(
    chromium_binary: Path,
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_upstream: FakeSupabase,
) -> AsyncIterator[Scene]:
    devtools_url = await nursery.start(HeadlessChromium(chromium_binary, tmp_path / "profile").run)
    relay_ended = trio.Event()

    async def run_until_stopped(*, task_status: trio.TaskStatus[RunningRelay]) -> None:
        try:
            await run_relay(scene_config(tmp_path, fake_upstream.url), task_status=task_status)
        finally:
            relay_ended.set()

    with trio.fail_after(30):
        running: RunningRelay = await nursery.start(run_until_stopped)
    async with httpx.AsyncClient(base_url=running.url) as http, open_page(devtools_url) as page:
        with trio.fail_after(30):
            watch = await set_the_scene(http, fake_upstream, HOSTILE_REFUSAL)
        yield Scene(running, fake_upstream, watch, page, relay_ended)
        running.stop()
        with trio.fail_after(30):
            await relay_ended.wait()


@pytest.mark.external
async def test_a_person_sees_every_faction_its_state_and_a_refreshing_page(
    scene: Scene, tmp_path: Path
) -> None:
    page, relay_url = scene.page, scene.relay.url
    with trio.fail_after(60):
        await page.open(f"{relay_url}/?refresh=1")
        seen = await page.rendered(1)

    tiles = seen["tiles"]
    assert re.fullmatch(r"\d+ s", tiles.pop("uptime"))
    assert tiles == {"connected": "1 / 2", "faulted": "1", "version": relay.__version__}
    assert seen["title"] == "(1 faulted) CAT Relay status"
    assert seen["banner"] is None
    assert seen["headings"] == [
        "Faction",
        "Upstream",
        "Last event",
        "Events, last 30 min",
        "Members",
        "Stored",
        "Last poll",
    ]
    # The faction that needs a person comes first.
    faulted, live = seen["rows"]
    assert (faulted["faction"], live["faction"]) == (FAULTED, LIVE)

    upstream = faulted["cells"]["Upstream"].split("\n")
    assert upstream[0] == "auth failed"
    assert upstream[1].endswith(f"HTTP 401 {HOSTILE_REFUSAL}")  # upstream's markup, shown as text
    assert re.fullmatch(r"retry in \d+ s · \d+ attempts?", upstream[2])
    assert seen["elements"] == 0
    assert (faulted["cells"]["Last event"], faulted["cells"]["Members"], faulted["cells"]["Stored"]) == (
        "never",
        "0",
        "0",
    )
    assert faulted["cells"]["Events, last 30 min"] == "0 events"

    assert re.fullmatch(r"connected\nfor \d+ s", live["cells"]["Upstream"])
    assert re.fullmatch(r"\d+ s ago", live["cells"]["Last event"])
    assert re.fullmatch(r"\d+ s ago", live["cells"]["Last poll"])
    assert (live["cells"]["Members"], live["cells"]["Stored"]) == ("1", str(LIVE_CHANGES))
    assert live["cells"]["Events, last 30 min"] == f"{LIVE_CHANGES} events"
    (sparkline,) = live["sparklines"]
    values = [int(v) for v in sparkline["values"].split(",")]
    assert (len(values), sum(values)) == (30, LIVE_CHANGES)
    heights = sparkline_heights(sparkline["line"])
    assert len(heights) == 30
    assert min(heights) < max(heights)  # the minute with the calls stands out

    # Everything it asked for came from the relay it was served by, and it met no error on the way.
    urls = page.requested_urls()
    assert f"{relay_url}/status" in urls
    assert all(url.startswith(f"{relay_url}/") for url in urls), urls
    assert page.problems() == []

    # It refreshes by itself: a call stored after the page's latest render shows two renders on (the
    # render in flight may have asked before the call was stored).
    with trio.fail_after(30):
        scene.fake.insert("war_calls", call(LIVE, LIVE_CHANGES + 1))
        await scene.watch.until(lambda factions, _: factions[LIVE]["events_stored"] == LIVE_CHANGES + 1)
        drawn = (await page.evaluate(READ_PAGE))["renders"]
        refreshed = await page.rendered(drawn + 2)
    (_, live) = refreshed["rows"]
    assert live["cells"]["Stored"] == str(LIVE_CHANGES + 1)
    assert live["cells"]["Events, last 30 min"] == f"{LIVE_CHANGES + 1} events"

    # On a phone each faction is a card whose every value carries its label.
    with trio.fail_after(30):
        await page.resize(*PHONE, mobile=True)
        card = await page.evaluate(READ_PAGE)
        await page.resize(*WIDE)
        shot = tmp_path / "status-page.png"
        await page.screenshot(shot, WIDE[0])
    assert card["headings"] == []
    assert all(row["labels"] == [json.dumps(h) for h in seen["headings"]] for row in card["rows"])
    assert (await trio.Path(shot).read_bytes()).startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.external
async def test_an_unreachable_relay_is_said_and_its_last_figures_kept_greyed(scene: Scene) -> None:
    page = scene.page
    with trio.fail_after(60):
        await page.open(f"{scene.relay.url}/?refresh=1")
        before = await page.rendered(1)
        scene.relay.stop()
        await scene.relay_ended.wait()
        stopped = await page.evaluate(READ_PAGE)
        after = await page.rendered(stopped["renders"] + 2)  # the later one asked once the relay had gone
    assert before["banner"] is None
    assert after["banner"] is not None
    assert re.fullmatch(
        r"Relay unreachable since .+ \(\d+ s\): Failed to fetch\. Retrying every 1 s\. "
        r"The figures below are from .+\.",
        after["banner"],
    )
    assert after["stale"] is True
    assert after["title"] == "(unreachable) CAT Relay status"
    # The last figures stay on the page: both factions, as the last answer had them.
    assert [row["faction"] for row in after["rows"]] == [FAULTED, LIVE]
    assert after["rows"] == stopped["rows"]


# --- the README's screenshot -----------------------------------------------------------------------


async def write_screenshot(path: Path, width: int, dark: bool) -> None:
    """The scene above, with upstream's real wording, photographed at `width` pixels."""
    with tempfile.TemporaryDirectory() as directory, trio.fail_after(60 + SCREENSHOT_AFTER_S):
        async with trio.open_nursery() as nursery:
            fake = FakeSupabase(valid_keys=(ANON_KEY,))
            await nursery.start(fake.run)
            devtools_url = await nursery.start(HeadlessChromium(CHROMIUM, Path(directory) / "profile").run)
            async with trio.open_nursery() as relay_nursery:
                running: RunningRelay = await relay_nursery.start(
                    run_relay, scene_config(Path(directory), fake.url)
                )
                async with httpx.AsyncClient(base_url=running.url) as http, open_page(devtools_url) as page:
                    await set_the_scene(http, fake, PLAIN_REFUSAL)
                    await trio.sleep(SCREENSHOT_AFTER_S)
                    await http.get(
                        "/events", params={"faction_id": LIVE, "since": 0}
                    )  # the member's next poll
                    if dark:
                        features = [{"name": "prefers-color-scheme", "value": "dark"}]
                        await page.call("Emulation.setEmulatedMedia", features=features)
                    mobile = width <= PHONE[0] * 2
                    await page.resize(width, WIDE[1], mobile=mobile)
                    await page.open(f"{running.url}/")
                    await page.rendered(1)
                    await page.screenshot(path, width, mobile=mobile)
                running.stop()
            nursery.cancel_scope.cancel()  # the fake and Chromium, once the relay has shut down


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Photograph the status page of a relay with a live and a faulted faction."
    )
    parser.add_argument("--screenshot", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--width", type=int, default=WIDE[0], help="window width in CSS pixels")
    parser.add_argument("--dark", action="store_true", help="prefers-color-scheme: dark")
    args = parser.parse_args()
    trio.run(write_screenshot, args.screenshot, args.width, args.dark)


if __name__ == "__main__":
    main()
