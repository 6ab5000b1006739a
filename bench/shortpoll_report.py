"""The short-polling benchmark's report: per server medians and min-max, the per-repetition table, the
relay's ratios to the floor and to the Node relay, and the Node relay's capacity in members."""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.processes import REPOSITORY
from bench.pyspy import SAMPLES_PER_S, Profile, summary_lines
from bench.wrk_runs import WrkRun, wrk_command

SERVERS = ("floor", "relay", "node")
FLOOR_GOAL = 0.9  # issue 6, point 2: the relay's /events at least 0.9x the bare-hypercorn floor
POLL_INTERVAL_S = 1.0  # issue 6, point 3: members polling once a second
PROFILE_TOP = 20


def _median_range(values: Sequence[float], digits: int = 0) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def _of(runs: Sequence[WrkRun], server: str) -> list[WrkRun]:
    return [run for run in runs if run.server == server]


def ratios(
    runs: Sequence[WrkRun], numerator: str, denominator: str, *, per_cpu_s: bool = False
) -> list[float]:
    """Per repetition, `numerator` req/s ÷ `denominator` req/s (the two ran seconds apart), or the
    same of their requests per CPU-second."""
    by_repetition: dict[int, dict[str, float]] = {}
    for run in runs:
        by_repetition.setdefault(run.repetition, {})[run.server] = run.per_cpu_s if per_cpu_s else run.per_s
    return [
        figures[numerator] / figures[denominator]
        for _, figures in sorted(by_repetition.items())
        if numerator in figures and figures[denominator]
    ]


def node_capacity(runs: Sequence[WrkRun]) -> tuple[float, float] | None:
    """The Node relay's saturated req/s on one core (= members it serves polling every second), and
    its req/s per CPU-second (the same, corrected for any part of the core it left unused)."""
    node = _of(runs, "node")
    if not node:
        return None
    per_s = statistics.median(run.per_s for run in node)
    per_cpu_s = statistics.median(run.per_cpu_s for run in node)
    return per_s, per_cpu_s


def _others_percent(run: WrkRun) -> float:
    # /proc/stat counts 10 ms ticks: a few ms below zero is zero.
    return max(0.0, 100 * (run.others_on_cpu_s or 0.0) / run.elapsed_s)


def summary_rows(runs: Sequence[WrkRun]) -> list[str]:
    rows = []
    for server in SERVERS:
        mine = _of(runs, server)
        if not mine:
            continue
        cells = [
            server,
            str(len(mine)),
            _median_range([run.per_s for run in mine]),
            _median_range([run.per_cpu_s for run in mine]),
            _median_range([run.p50_ms for run in mine], 1),
            _median_range([run.p99_ms for run in mine], 1),
            _median_range([run.max_ms for run in mine], 1),
            _median_range([100 * run.server_cpu_share for run in mine]),
            _median_range([100 * run.wrk_cpu_share for run in mine]),
            f"{max(100 * cpu / run.elapsed_s for run in mine for cpu in run.idle_cpu_s.values()):.1f}",
            _median_range([_others_percent(run) for run in mine if run.others_on_cpu_s is not None]),
            _median_range([100 * run.steal_s / run.elapsed_s for run in mine if run.steal_s is not None]),
            f"{statistics.median(run.bytes_read / run.requests for run in mine):.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def repetition_rows(runs: Sequence[WrkRun]) -> list[str]:
    rows = []
    for repetition in sorted({run.repetition for run in runs}):
        figures = {run.server: run for run in runs if run.repetition == repetition}
        cells = [str(repetition)]
        for server in SERVERS:
            run = figures.get(server)
            cells.append("-" if run is None else f"{run.per_s:,.0f} ({100 * run.server_cpu_share:.0f} %)")
        for numerator, denominator in (("relay", "floor"), ("relay", "node")):
            top, bottom = figures.get(numerator), figures.get(denominator)
            cells.append("-" if top is None or bottom is None else f"{top.per_s / bottom.per_s:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


NODE_GOAL = 1.0  # issue 18, point 1: short polls at least as fast as the Node relay's


def verdict(runs: Sequence[WrkRun]) -> str:
    to_floor = ratios(runs, "relay", "floor")
    if not to_floor:
        return "no relay ÷ floor ratio measured"
    median = statistics.median(to_floor)
    met = "met" if median >= FLOOR_GOAL else f"not met: short by {FLOOR_GOAL - median:.3f}"
    line = f"Goal (issue 6, point 2): relay ÷ floor ≥ {FLOOR_GOAL:g}: median {median:.3f}, {met}."
    to_node = ratios(runs, "relay", "node")
    if to_node:
        median = statistics.median(to_node)
        met = "met" if median >= NODE_GOAL else f"not met: short by {NODE_GOAL - median:.3f}"
        line += f" Goal (issue 18, point 1): relay ÷ node ≥ {NODE_GOAL:g}: median {median:.3f}, {met}."
    return line


@dataclass(frozen=True)
class Plan:
    factions: int
    events_per_faction: int
    connections: int
    duration_s: float
    warmup_s: float
    repetitions: int
    pin: bool
    profile: bool
    profile_raw: Path | None
    # The relay's `server.hot_path`; off measures the ASGI path (bench/DESIGNS-hotpath.md).
    hot_path: bool = True


@dataclass(frozen=True)
class Profiled:
    server: str
    run: WrkRun
    profile: Profile


@dataclass(frozen=True)
class Outcome:
    runs: list[WrkRun]
    checks: list[str]
    mean_event_bytes: float
    paths: int
    profiled: list[Profiled]


def commands(plan: Plan, command: str) -> list[str]:
    wrk = shlex.join(
        wrk_command(
            "http://127.0.0.1:PORT",
            Path("PATHS"),
            connections=plan.connections,
            duration_s=plan.duration_s,
            cpu=1 if plan.pin else None,
        )
    )
    return [
        command,
        "# per run, against each server in turn (PATHS: the path list the benchmark wrote):",
        wrk.replace(f"{REPOSITORY}/", ""),
        "# the servers, started once:",
        ".venv/bin/relay serve --config relay.toml   # [limits] client_rate = 0; RELAY_* for upstream, port, database",
        ".venv/bin/python -m bench.peers.floor --port 0",
        "node bench/peers/node-relay/server.js --seed seed.json --port 0",
        ".venv/bin/python -m bench.seeded_upstream --seed seed.json   # the relay's quiet upstream",
    ]


def setup_lines(plan: Plan, outcome: Outcome) -> list[str]:
    pinning = (
        "Each server alone on CPU 0 for its runs (every thread, `sched_setaffinity`), the other two moved to "
        "CPU 1 meanwhile (they idle: see their CPU below); wrk, the fake upstream and the benchmark on CPU 1."
        if plan.pin
        else "No CPU pinning: the servers, wrk and the fake upstream share every CPU."
    )
    return [
        f"Data: {plan.factions} factions, {plan.events_per_faction} stored war_calls INSERTs each "
        f"(`postgres_changes`, {outcome.mean_event_bytes:.0f} bytes per event as served), stamped over the last hour.",
        f"Mix: {outcome.paths} paths, per faction 90 % empty polls (since = its newest stamp) and 10 % returning "
        "1-5 events (since = the stamp of the event 1-5 before the newest, each count as often), shuffled "
        "with a fixed seed; wrk requests them in order, round and round, the same list for every server.",
        f"wrk: 1 thread, {plan.connections} keep-alive connections, {plan.warmup_s:g} s warm-up per server, then "
        f"{plan.repetitions} repetitions of {plan.duration_s:g} s, interleaved floor, relay, node. A run with any "
        "socket error or non-2xx answer fails the benchmark.",
        "The servers were started once and kept running across repetitions: a restart would measure the Python "
        "servers' first requests and V8's JIT warming up, and would make the relay reconnect its 100 upstream "
        "sockets and reconcile, none of which is what a member's poll costs.",
        pinning,
        "floor: a bare ASGI app answering every request with the relay's empty /events body and headers, under "
        "hypercorn's trio worker with the relay's own settings (`relay.http.server.hypercorn_config`). node: Express 5, "
        "events in an in-memory list per faction filtered by since, `res.json` (Express defaults: ETag, X-Powered-By).",
        "relay: `server.hot_path = "
        + (
            "true`: plain polls answered at the request boundary (`relay/http/hotpath.py`)."
            if plan.hot_path
            else "false`: every poll through hypercorn's protocol and the ASGI app (`--no-hot-path`)."
        ),
    ]


def render(plan: Plan, outcome: Outcome, *, machine: Sequence[str], command: str) -> str:
    runs = outcome.runs
    lines = ["# Short polling: the relay against the hypercorn floor and the Node relay", ""]
    lines += [f"- {line}" for line in machine]
    lines += ["", "Commands:", "", "```sh", *commands(plan, command), "```", ""]
    lines += [*[f"- {line}" for line in setup_lines(plan, outcome)], ""]
    header = (
        "| server | runs | req/s median (min-max) | req per CPU-second | p50 ms | p99 ms | max ms "
        "| server CPU % of its core | wrk CPU % | idle servers' CPU %, max | its core busy with others % "
        "| its core stolen % | bytes/answer with headers |"
    )
    lines += [header, "|" + "---|" * header.count(" | ") + "---|", *summary_rows(runs), ""]
    lines += [
        "Ratios, per repetition (the servers ran one after another, seconds apart), median (min-max). "
        "Requests per CPU-second (requests ÷ the server's own CPU time) is the figure least disturbed when "
        "other processes take part of the server's core (see *its core busy with others*):",
        "",
        "| | relay ÷ floor | relay ÷ node |",
        "|---|---|---|",
    ]
    for label, by_cpu in (("requests/s", False), ("requests per CPU-second", True)):
        cells = [
            _median_range(ratios(runs, "relay", peer, per_cpu_s=by_cpu), 2) for peer in ("floor", "node")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", verdict(runs), ""]
    capacity = node_capacity(runs)
    if capacity is not None:
        per_s, per_cpu_s = capacity
        relay = _of(runs, "relay")
        relay_line = (
            f" The relay, same mix, same core: {statistics.median(run.per_s for run in relay):,.0f} req/s."
            if relay
            else ""
        )
        lines += [
            f"Node relay capacity on one core, members polling every {POLL_INTERVAL_S:g} s (issue 6, point 3): "
            f"**{per_s / POLL_INTERVAL_S:,.0f} members** (its median saturated req/s with this mix; "
            f"{per_cpu_s:,.0f} requests per CPU-second).{relay_line}",
            "",
        ]
    lines += ["Per repetition, req/s (server CPU %) and ratios of req/s:", ""]
    lines += [
        "| repetition | floor | relay | node | relay ÷ floor | relay ÷ node |",
        "|---|---|---|---|---|---|",
        *repetition_rows(runs),
        "",
        "Checks:",
        "",
        *[f"- {line}" for line in outcome.checks],
    ]
    for profiled in outcome.profiled:
        lines += [
            "",
            f"## py-spy: the {profiled.server} during one more run ({one_line(profiled.run).partition(': ')[2]})",
            "",
            f"Sampled {SAMPLES_PER_S} times a second from wrk's CPU (`py-spy record`, which pauses the process "
            "for each sample, so this run is slower and not counted above). Self: the function on top of the "
            "stack; inclusive: anywhere in it.",
            "",
            *summary_lines(profiled.profile, PROFILE_TOP),
        ]
    return "\n".join(lines) + "\n"


def one_line(run: WrkRun) -> str:
    label = {0: "warm-up", -1: "profiled"}.get(run.repetition, f"#{run.repetition}")
    return (
        f"{run.server} {label}: {run.per_s:,.0f} req/s, p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms, "
        f"{run.server} CPU {100 * run.server_cpu_share:.0f} %, wrk CPU {100 * run.wrk_cpu_share:.0f} %"
        + ("" if run.others_on_cpu_s is None else f", its core busy with others {_others_percent(run):.0f} %")
    )
