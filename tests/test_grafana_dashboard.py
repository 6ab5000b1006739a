"""deploy/grafana/cat-relay.json and deploy/prometheus/alerts.yml against a real Prometheus (Debian's),
which runs deploy/prometheus/prometheus.yml (its target and intervals substituted) and scrapes a real
`relay serve` while members poll, long-poll and hold a stream and war calls arrive upstream.

Grafana itself cannot run here (it is in neither Debian nor npm), so the test sends Prometheus what
Grafana would: every panel's query with its variables filled in as Grafana fills them, which must
parse and return series. A healthy relay fires no alert, so an alert's empty answer proves nothing:
its expression must parse and every series it reads must exist. Every rule group must load and
evaluate, and none may fire.

`python -m tests.test_grafana_dashboard --screenshot docs/prometheus-graph.png` photographs
Prometheus's graph page of the key series from the same scene (the README's picture).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
import yaml

from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION, call
from tests.helpers.ports import free_port
from tests.helpers.programs import CHROMIUM, CHROMIUM_FLAGS, PROMETHEUS
from tests.helpers.relay_process import relay_process
from tests.helpers.sse_client import open_sse
from tests.helpers.userscript import Userscript, wait_connected
from tests.helpers.waits import eventually_async

pytestmark = pytest.mark.external

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "cat-relay.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
FACTIONS = (FACTION, OTHER_FACTION, 9356)
# Probes every second, so that their REST requests show within the test; no rate limit, since one
# address makes every member's requests and Prometheus scrapes every second.
RELAY_TOML = (
    '[server]\nport = 0\n[storage]\npath = "data/relay.db"\n'
    "[upstream]\nheartbeat_interval_s = 2.0\nprobe_interval_s = 1.0\nprobe_grace_s = 0.5\n"
    "[limits]\nclient_rate = 0\n"
)
SCRAPE_INTERVAL_S = 1
# What Grafana puts in a query when its data source's scrape interval is set to Prometheus's:
# $__interval never below the scrape interval (a short time range gives that), and $__rate_interval
# max($__interval + scrape interval, 4 x scrape interval).
INTERVAL_S = SCRAPE_INTERVAL_S
RATE_INTERVAL_S = max(INTERVAL_S + SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S)
CALL_EVERY_S = 0.2
POLL_EVERY_S = 0.25
LONG_POLL_WAIT_S = 2
QUERY_DEADLINE_S = 30.0  # for one query's series to appear; a failure names the query
STDERR_KEPT_BYTES = 16384
STOP_WAIT_S = 10.0
# The alerts' expressions read these: a metric name and its label matchers (ranges and functions aside).
SELECTOR = re.compile(r"\b((?:cat_relay|process)_\w+|up)\b(\{[^}]*\})?")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
REGEX_SPECIALS = re.compile(r"[$^*{}\[\]'+?.()|]")
# The panels the issue asks for, by the series they read.
SERIES_ON_PANELS = {
    "cat_relay_upstream_state",
    "cat_relay_members",
    "cat_relay_events_stored_total",
    "cat_relay_events_served_total",
    "cat_relay_http_request_duration_seconds_bucket",
    "cat_relay_held_requests",
    "cat_relay_upstream_reconnects_total",
    "cat_relay_reconciles_total",
    "cat_relay_reconcile_rest_requests_total",
    "cat_relay_deaf_probe_requests_total",
    "cat_relay_reconcile_rest_bytes_total",
    "cat_relay_deaf_probe_bytes_total",
    "cat_relay_database_size_bytes",
    "cat_relay_database_wal_size_bytes",
}
# The README's picture: Prometheus's classic graph page (Debian ships that UI), one graph per series.
SCREENSHOT_SERIES = (
    "sum by (source) (rate(cat_relay_events_stored_total[10s]))",
    "sum by (faction_id) (rate(cat_relay_events_served_total[10s]))",
    "sum by (kind) (cat_relay_held_requests)",
    'histogram_quantile(0.99, sum by (le) (rate(cat_relay_http_request_duration_seconds_bucket{route="/events"}[10s])))',
    "sum by (state) (cat_relay_upstream_state)",
)
SCREENSHOT_SIZE = (1280, 3800)


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panel_queries() -> Iterator[tuple[str, str]]:
    """Every panel's title and each of its queries."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def alerting_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable's values as Grafana's Prometheus data source writes them into a query
    (`prometheusRegularEscape`, then one value alone or `(a|b)`)."""
    escaped = [
        REGEX_SPECIALS.sub(lambda m: "\\\\" + m[0], value.replace("\\", "\\\\\\\\")) for value in values
    ]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Each `$name` or `${name}` replaced; an unknown variable is a KeyError."""
    return VARIABLE.sub(lambda m: variables[m[1] or m[2]], expr)


# --- the scene: Prometheus scraping a relay under member traffic --------------------------------------


def render(text: str, target: str) -> str:
    """The shipped Prometheus config with the test's relay and intervals: each substitution must find
    exactly its text, so that the file and the test cannot drift apart."""
    substitutions = [
        ("scrape_interval: 15s", f"scrape_interval: {SCRAPE_INTERVAL_S}s"),
        ("evaluation_interval: 15s", f"evaluation_interval: {SCRAPE_INTERVAL_S}s"),
        ("  - alerts.yml", f"  - {RULES}"),
        ('"127.0.0.1:8444"', f'"{target}"'),
    ]
    for old, new in substitutions:
        assert text.count(old) == 1, f"deploy/prometheus/prometheus.yml no longer has {old!r} once"
        text = text.replace(old, new)
    return text


async def keep_tail(stream: trio.abc.ReceiveStream, kept: bytearray) -> None:
    async for chunk in stream:
        kept.extend(chunk)
        del kept[:-STDERR_KEPT_BYTES]


@asynccontextmanager
async def open_prometheus(binary: Path, folder: Path, target: str) -> AsyncIterator[str]:
    """Prometheus with a folder of its own, scraping `target` (host:port); yields its URL once ready."""
    await trio.Path(folder).mkdir()
    config = folder / "prometheus.yml"
    await trio.Path(config).write_text(render(await trio.Path(PROMETHEUS_CONFIG).read_text(), target))
    url = f"http://127.0.0.1:{free_port()}"
    process = await trio.lowlevel.open_process(
        [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={urllib.parse.urlsplit(url).netloc}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(keep_tail, process.stderr, log)
            await wait_ready(url, process, log)
            yield url
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_WAIT_S):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def wait_ready(url: str, process: trio.Process, log: bytearray) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while True:
            assert process.returncode is None, log.decode(errors="replace")
            try:
                if (await http.get("/-/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await trio.sleep(0.1)


@dataclass(frozen=True)
class Scene:
    relay_url: str
    prometheus_url: str


@asynccontextmanager
async def watched_relay(folder: Path, fake: FakeSupabase, prometheus: Path) -> AsyncIterator[Scene]:
    """`relay serve` scraped by Prometheus, its members' traffic running (`member_traffic`) until the
    `with` ends."""
    config = folder / "relay.toml"
    await trio.Path(config).write_text(RELAY_TOML)
    env = {**os.environ, "RELAY_UPSTREAM_URL": fake.url, "RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    async with relay_process(config, env) as relay:
        target = urllib.parse.urlsplit(relay.url).netloc
        async with (
            open_prometheus(prometheus, folder / "prometheus", target) as url,
            trio.open_nursery() as traffic,
        ):
            await traffic.start(member_traffic, relay.url, fake)
            yield Scene(relay.url, url)
            traffic.cancel_scope.cancel()


async def member_traffic(
    relay_url: str, fake: FakeSupabase, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Until cancelled: three factions' members polling, one long-polling, two holding an SSE stream
    each, and war calls upstream in bursts. Started once every faction is connected and the streams
    are open."""
    async with httpx.AsyncClient(base_url=relay_url, timeout=30) as http:
        scripts = [Userscript(http, faction_id) for faction_id in FACTIONS]
        for script in scripts:
            await script.start()
        for faction_id in FACTIONS:
            await wait_connected(http, faction_id)
        async with trio.open_nursery() as nursery:
            await nursery.start(hold_stream, relay_url, FACTION)
            await nursery.start(hold_stream, relay_url, FACTIONS[2])
            nursery.start_soon(long_poll, http, OTHER_FACTION)
            nursery.start_soon(poll, scripts)
            nursery.start_soon(make_calls, fake)
            task_status.started()


async def hold_stream(
    relay_url: str, faction_id: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_sse(relay_url, f"/events/stream?faction_id={faction_id}") as stream:
        assert stream.status == 200
        task_status.started()
        while True:
            await stream.next_record()


async def long_poll(http: httpx.AsyncClient, faction_id: int) -> None:
    cursor = int(time.time() * 1000)
    while True:
        params = {"faction_id": faction_id, "since": cursor, "wait": LONG_POLL_WAIT_S}
        body = (await http.get("/events", params=params)).json()
        if body["events"]:
            cursor = body["timestamp"]


async def poll(scripts: list[Userscript]) -> None:
    while True:
        for script in scripts:
            await script.poll()
        await trio.sleep(POLL_EVERY_S)


async def make_calls(fake: FakeSupabase) -> None:
    """A call every CALL_EVERY_S, with a pause after every 20th, so that the graphs have a shape."""
    for n in itertools.count(1):
        fake.insert("war_calls", call(FACTIONS[n % len(FACTIONS)], n))
        await trio.sleep(CALL_EVERY_S if n % 20 else 15 * CALL_EVERY_S)


# --- asking Prometheus ---------------------------------------------------------------------------------


async def query(prometheus: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    """An instant query's series; a query Prometheus cannot parse fails at once, naming itself."""
    body = (await prometheus.get("/api/v1/query", params={"query": expr})).json()
    assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
    assert body["data"]["resultType"] == "vector", expr
    series: list[dict[str, Any]] = body["data"]["result"]
    return series


async def label_values(prometheus: httpx.AsyncClient, selector: str, label: str) -> list[str]:
    body = (await prometheus.get(f"/api/v1/label/{label}/values", params={"match[]": selector})).json()
    assert body["status"] == "success", f"{selector}: {body.get('error')}"
    values: list[str] = body["data"]
    return values


async def wait_for_some(ask: Callable[[], Awaitable[list[T]]], what: str) -> list[T]:
    """What `ask` answers once it is not empty (the next scrapes bring it); a failure says what."""
    found: list[T] = []

    async def step() -> None:
        found[:] = await ask()

    with trio.move_on_after(QUERY_DEADLINE_S):
        await eventually_async(step, lambda: found, pause_s=SCRAPE_INTERVAL_S / 4)
        return found
    pytest.fail(f"nothing within {QUERY_DEADLINE_S:g} s: {what}")


async def grafana_variables(prometheus: httpx.AsyncClient) -> dict[str, str]:
    """The dashboard's variables with "All" chosen, as Grafana fills them in: each query variable's
    `label_values(...)` asked of Prometheus, which must list something."""
    variables = {"__interval": f"{INTERVAL_S}s", "__rate_interval": f"{RATE_INTERVAL_S}s"}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = LABEL_VALUES.match(variable["query"]["query"])
        assert found, variable["name"]
        selector, label = substitute(found[1], variables), found[2]
        values = await wait_for_some(
            functools.partial(label_values, prometheus, selector, label),
            f"variable {variable['name']}: values of {label} in {selector}",
        )
        if label == "faction_id":
            assert {str(faction_id) for faction_id in FACTIONS} <= set(values)
        variables[variable["name"]] = variable.get("allValue") or grafana_regex(values)
    return variables


# --- the tests -----------------------------------------------------------------------------------------


def test_the_dashboard_is_importable_as_it_is() -> None:
    """What Grafana's import needs: one Prometheus input that the data source variable defaults to,
    every panel and query on that variable, unique ids, panels inside 24 columns and not overlapping,
    and the panels the issue asks for."""
    document = dashboard()
    assert document["schemaVersion"] == 39
    assert document["id"] is None
    assert document["uid"] == "cat-relay"
    (source,) = document["__inputs"]
    assert (source["type"], source["pluginId"]) == ("datasource", "prometheus")
    assert set(re.findall(r"\$\{(DS_\w+)\}", DASHBOARD.read_text())) == {source["name"]}
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}
    chosen = variables["datasource"]
    assert (chosen["type"], chosen["query"]) == ("datasource", "prometheus")
    assert chosen["current"]["value"] == "${" + source["name"] + "}"
    on_the_variable = {"type": "prometheus", "uid": "${datasource}"}
    assert all(v["datasource"] == on_the_variable for v in variables.values() if v["type"] == "query")
    panels = document["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        where = panel["gridPos"]
        assert where["x"] + where["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(where["x"], where["x"] + where["w"])
            for y in range(where["y"], where["y"] + where["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == on_the_variable, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"] == on_the_variable for target in panel["targets"]), panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), panel["title"]
    read = {name for _, expr in panel_queries() for name in re.findall(r"\bcat_relay_\w+", expr)}
    assert read >= SERIES_ON_PANELS


async def test_every_panel_reads_series_from_a_relay_under_traffic(
    tmp_path: Path, fake_upstream: FakeSupabase, prometheus_binary: Path
) -> None:
    with trio.fail_after(120):
        async with (
            watched_relay(tmp_path, fake_upstream, prometheus_binary) as scene,
            httpx.AsyncClient(base_url=scene.prometheus_url, timeout=10) as prometheus,
        ):
            variables = await grafana_variables(prometheus)
            queries = list(panel_queries())
            for title, expr in queries:
                panel_query = substitute(expr, variables)
                await wait_for_some(
                    functools.partial(query, prometheus, panel_query), f"panel {title!r}: {panel_query}"
                )
    assert len(queries) == sum(len(panel.get("targets", [])) for panel in dashboard()["panels"])


async def test_every_alert_reads_series_from_a_relay_and_every_rule_loads(
    tmp_path: Path, fake_upstream: FakeSupabase, prometheus_binary: Path
) -> None:
    rules = alerting_rules()
    groups = [group["name"] for group in yaml.safe_load(RULES.read_text())["groups"]]
    with trio.fail_after(120):
        async with (
            watched_relay(tmp_path, fake_upstream, prometheus_binary) as scene,
            httpx.AsyncClient(base_url=scene.prometheus_url, timeout=10) as prometheus,
        ):
            for rule in rules:
                await query(prometheus, rule["expr"])  # parses (a healthy relay: mostly no series)
                selectors = [found[0] for found in SELECTOR.finditer(rule["expr"])]
                assert selectors, rule["alert"]
                for selector in selectors:
                    await wait_for_some(
                        functools.partial(query, prometheus, selector), f"{rule['alert']}: {selector}"
                    )
            loaded = await wait_evaluated(prometheus, len(rules))
    assert sorted(group["name"] for group in loaded) == sorted(groups)  # Prometheus lists them by name
    evaluated = [rule for group in loaded for rule in group["rules"]]
    assert sorted(rule["name"] for rule in evaluated) == sorted(rule["alert"] for rule in rules)
    assert all(rule["type"] == "alerting" for rule in evaluated)
    assert [rule["name"] for rule in evaluated if rule["health"] != "ok"] == []
    assert [rule["name"] for rule in evaluated if rule["state"] == "firing"] == []


async def wait_evaluated(prometheus: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    """/api/v1/rules once every rule has been evaluated at least once (health is "unknown" before)."""
    while True:
        body = (await prometheus.get("/api/v1/rules")).json()
        assert body["status"] == "success", body
        groups: list[dict[str, Any]] = body["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if len(rules) == count and all(rule["health"] != "unknown" for rule in rules):
            return groups
        await trio.sleep(SCRAPE_INTERVAL_S / 4)


# --- the README's screenshot ---------------------------------------------------------------------------


def graph_page(prometheus_url: str, range_s: int) -> str:
    parameters: dict[str, str] = {}
    for n, expr in enumerate(SCREENSHOT_SERIES):
        parameters |= {f"g{n}.expr": expr, f"g{n}.tab": "0", f"g{n}.range_input": f"{range_s}s"}
    return f"{prometheus_url}/classic/graph?{urllib.parse.urlencode(parameters)}"


async def write_screenshot(path: Path, duration_s: int) -> None:
    """The scene above for `duration_s`, then Prometheus's graph page of it in headless Chromium."""
    with tempfile.TemporaryDirectory() as directory, trio.fail_after(duration_s + 120):
        async with trio.open_nursery() as nursery:
            fake = FakeSupabase(valid_keys=(ANON_KEY,))
            await nursery.start(fake.run)
            async with watched_relay(Path(directory), fake, PROMETHEUS) as scene:
                await trio.sleep(duration_s)  # the history the graphs show: a picture, not a test
                width, height = SCREENSHOT_SIZE
                await trio.run_process(
                    [
                        str(CHROMIUM),
                        *CHROMIUM_FLAGS,
                        "--hide-scrollbars",
                        f"--window-size={width},{height}",
                        "--virtual-time-budget=15000",  # lets the page's queries come back and draw
                        f"--screenshot={path}",
                        graph_page(scene.prometheus_url, duration_s),
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                )
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Photograph Prometheus's graph page of a relay's key series under member traffic."
    )
    parser.add_argument("--screenshot", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--duration", type=int, default=180, help="seconds of traffic the graphs show")
    args = parser.parse_args()
    trio.run(write_screenshot, args.screenshot.resolve(), args.duration)


if __name__ == "__main__":
    main()
