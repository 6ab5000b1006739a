"""Turning the benchmark's tallies into a Markdown report: per-scenario figures and SSE/long-poll ratios."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.clients import Tally
from bench.probes import Probes, percentile
from bench.processes import GcPause

MB = 1024 * 1024
PROFILE_SLICES = 10


@dataclass(frozen=True)
class Measurement:
    elapsed_s: float
    relay_cpu_s: float
    upstream_cpu_s: float
    loadgen_cpu_s: float
    relay_rss_bytes: int
    relay_idle_rss_bytes: int  # the same relay, subscribed, before its clients came
    probes: Probes
    relay_gc: list[GcPause]


@dataclass(frozen=True)
class ScenarioResult:
    kind: str
    clients: int
    tally: Tally
    expected: int
    upstream_changes: int  # emitted in the window, all factions
    ramp_s: float
    warmup_s: float
    measurement: Measurement

    @property
    def delivered(self) -> int:
        return sum(self.tally.delivered.values())

    def profile_ms(self, slices: int) -> list[float | None]:
        """The median latency of the events emitted in each of `slices` equal parts of the window:
        flat when the relay keeps up, rising when a queue grows, a spike where a pause was."""
        width = (self.tally.window_to_ns - self.tally.window_from_ns) / slices
        parts: list[list[int]] = [[] for _ in range(slices)]
        for emitted, latency in zip(self.tally.emitted_ns, self.tally.latencies_ns, strict=True):
            parts[min(slices - 1, int((emitted - self.tally.window_from_ns) / width))].append(latency)
        return [sorted(part)[len(part) // 2] / 1e6 if part else None for part in parts]

    def split_p50_ms(self) -> tuple[float, float] | None:
        """Median of emit-to-stamp and of stamp-to-arrival (the relay's ms stamp: ±1 ms)."""
        if not self.tally.to_stamp_ns:
            return None
        to_stamp = sorted(self.tally.to_stamp_ns)
        after = sorted(t - s for t, s in zip(self.tally.latencies_ns, self.tally.to_stamp_ns, strict=True))
        return to_stamp[len(to_stamp) // 2] / 1e6, after[len(after) // 2] / 1e6

    def percentile_ms(self, fraction: float) -> float | None:
        """Nearest-rank percentile of the window's latencies."""
        ordered = self.sorted_latencies
        if not ordered:
            return None
        rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
        return ordered[rank] / 1e6

    @property
    def sorted_latencies(self) -> list[int]:
        return sorted(self.tally.latencies_ns)

    def cpu_percent(self, cpu_s: float) -> float:
        return 100.0 * cpu_s / self.measurement.elapsed_s

    @property
    def relay_cpu_us_per_event(self) -> float | None:
        if not self.delivered:
            return None
        return 1e6 * self.measurement.relay_cpu_s / self.delivered

    def delivery_cpu_us_per_event(self, ingest_cpu_share: float) -> float | None:
        """Relay CPU per delivered event once the cost of ingesting upstream (`ingest only`) is taken off."""
        if not self.delivered:
            return None
        delivery_cpu_s = self.measurement.relay_cpu_s - ingest_cpu_share * self.measurement.elapsed_s
        return 1e6 * max(0.0, delivery_cpu_s) / self.delivered

    def one_line(self) -> str:
        p50, p99 = self.percentile_ms(0.5), self.percentile_ms(0.99)
        return (
            f"{self.kind} N={self.clients}: delivered {self.delivered}/{self.expected}, "
            f"p50 {_ms(p50)} ms, p99 {_ms(p99)} ms, relay CPU {self.cpu_percent(self.measurement.relay_cpu_s):.0f}%, "
            f"load generator CPU {self.cpu_percent(self.measurement.loadgen_cpu_s):.0f}%, "
            f"errors {dict(self.tally.errors) or 0}"
        )


def _split(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"{pair[0]:.1f} / {pair[1]:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pair(values: list[float], low: float, high: float) -> str:
    low_value, high_value = percentile(values, low), percentile(values, high)
    if low_value is None or high_value is None:
        return "-"
    return f"{low_value * 1000:.1f} / {high_value * 1000:.1f}"


def _gc(pauses: list[GcPause]) -> str:
    if not pauses:
        return "-"
    full = sum(1 for pause in pauses if pause.generation == 2)
    longest_ms = max(pause.took_ns for pause in pauses) / 1e6
    total_s = sum(pause.took_ns for pause in pauses) / 1e9
    return f"{full}, {longest_ms:.0f}, {total_s:.1f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def machine_lines() -> list[str]:
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=False).stdout.strip()
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return [
        f"`{uname}`",
        f"Relay build: {relay_build()}",
        f"CPU: {model}, nproc {os.cpu_count()}; Python {platform.python_version()} ({sys.implementation.name}); "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]


def relay_build() -> str:
    """The commit the relay ran from, and whether the working tree differed from it."""
    repository = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [
        line for line in git("status", "--porcelain", "--", "relay", "migrations").splitlines() if line
    ]
    return f"commit {commit}" + (f" plus uncommitted changes to {len(changed)} files" if changed else "")


SCENARIO_HEADER = (
    "| scenario | clients | delivered / expected | p50 ms | p90 ms | p99 ms | max ms | p50 emit→stamp / stamp→client ms | relay CPU % "
    "| relay CPU µs/event | of it delivery µs/event | relay RSS MB | RSS KB/client | load-gen CPU % | upstream CPU % "
    "| relay /ping p50 / p99 ms | relay GC: full, longest ms, total s | load-gen loop lag p99 / max ms, full GCs | ramp-up s | warm-up s | client errors |"
)


def errors_cell(tally: Tally) -> str:
    """A scenario's client errors by kind, and the events the relay sent twice."""
    errors = ", ".join(f"{kind} {count}" for kind, count in sorted(tally.errors.items())) or "0"
    if tally.duplicates:
        errors += f", duplicates {tally.duplicates}"
    return errors


def scenario_row(result: ScenarioResult, ingest_cpu_share: float) -> str:
    m = result.measurement
    tally = result.tally
    errors = errors_cell(tally)
    if tally.gave_up:
        errors += f", gave up {tally.gave_up}"
    share = f"{result.delivered} / {result.expected}"
    if result.expected:
        share += f" ({100 * result.delivered / result.expected:.1f} %)"
    cells = [
        result.kind,
        str(result.clients),
        share if result.clients else f"{result.upstream_changes} changes ingested",
        _ms(result.percentile_ms(0.5)),
        _ms(result.percentile_ms(0.9)),
        _ms(result.percentile_ms(0.99)),
        _ms(result.percentile_ms(1.0)),
        _split(result.split_p50_ms()),
        _num(result.cpu_percent(m.relay_cpu_s)),
        _num(result.relay_cpu_us_per_event),
        _num(result.delivery_cpu_us_per_event(ingest_cpu_share)),
        _num(m.relay_rss_bytes / MB, 1),
        _num((m.relay_rss_bytes - m.relay_idle_rss_bytes) / result.clients / 1024) if result.clients else "-",
        _num(result.cpu_percent(m.loadgen_cpu_s)),
        _num(result.cpu_percent(m.upstream_cpu_s)),
        _pair(m.probes.ping_rtt_s, 0.5, 0.99)
        + (f" ({m.probes.ping_failures} failed)" if m.probes.ping_failures else ""),
        _gc(m.relay_gc),
        _pair(m.probes.loop_lag_s, 0.99, 1.0) + f", {m.probes.own_full_collections}",
        _num(result.ramp_s, 1),
        _num(result.warmup_s, 1),
        errors,
    ]
    return "| " + " | ".join(cells) + " |"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}"


def ingest_cpu_share(results: Sequence[ScenarioResult]) -> float:
    """The relay's CPU share with no clients at all: ingesting, storing, heartbeats."""
    for result in results:
        if result.clients == 0:
            return result.measurement.relay_cpu_s / result.measurement.elapsed_s
    return 0.0


def ratio_rows(results: Sequence[ScenarioResult]) -> list[str]:
    ingest = ingest_cpu_share(results)
    by_key = {(result.kind, result.clients): result for result in results}
    rows = []
    for (kind, clients), sse in sorted(by_key.items()):
        longpoll = by_key.get(("longpoll", clients))
        if kind != "sse" or longpoll is None:
            continue
        cells = [
            str(clients),
            _ratio(sse.relay_cpu_us_per_event, longpoll.relay_cpu_us_per_event),
            _ratio(sse.delivery_cpu_us_per_event(ingest), longpoll.delivery_cpu_us_per_event(ingest)),
            _ratio(sse.measurement.relay_cpu_s, longpoll.measurement.relay_cpu_s),
            _ratio(sse.measurement.relay_rss_bytes, longpoll.measurement.relay_rss_bytes),
            _ratio(
                sse.measurement.relay_rss_bytes - sse.measurement.relay_idle_rss_bytes,
                longpoll.measurement.relay_rss_bytes - longpoll.measurement.relay_idle_rss_bytes,
            ),
            _ratio(sse.percentile_ms(0.5), longpoll.percentile_ms(0.5)),
            _ratio(sse.percentile_ms(0.99), longpoll.percentile_ms(0.99)),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def per_member_rows(results: Sequence[ScenarioResult]) -> list[str]:
    """Each kind's delivery CPU per member against today's 3-s polling at the same client count."""
    ingest = ingest_cpu_share(results)
    by_key = {(result.kind, result.clients): result for result in results}

    def per_member_ms(result: ScenarioResult) -> float:
        share = result.measurement.relay_cpu_s / result.measurement.elapsed_s - ingest
        return 1000 * max(share, 0.0) / result.clients

    rows = []
    for (kind, clients), result in sorted(by_key.items()):
        poll = by_key.get(("poll", clients))
        if poll is None or not clients:
            continue
        cells = [
            kind,
            str(clients),
            f"{per_member_ms(result):.3f}",
            _ratio(per_member_ms(result), per_member_ms(poll)),
            _ms(result.percentile_ms(0.5)),
            _ms(result.percentile_ms(0.99)),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render(
    results: Sequence[ScenarioResult], plan: Sequence[str], machine: Sequence[str], command: str
) -> str:
    lines = ["# Delivery latency: upstream frame to client", "", *[f"- {line}" for line in machine]]
    lines += [f"- Command: `{command}`", *[f"- {line}" for line in plan], ""]
    lines += [
        "Latency: the client's clock when the answer (or SSE message) arrived minus the `emitted_ns` the fake "
        "upstream wrote into the row just before sending it (one machine, one clock). The relay stamps each event "
        "(`timestamp`, ms) in its writer thread as it inserts it, which splits the median in two: emit→stamp is "
        "the upstream socket and the wait for the single writer, stamp→client the commit, the wake-up and the "
        "answer. Relay CPU and RSS are the "
        "relay process alone (/proc, all threads; RSS is the largest sample in the window, and KB/client its growth over the same relay's RSS "
        "before the clients came, per client); "
        "*of it delivery* takes off the `ingest only` row's CPU share (upstream sockets, storing, heartbeats).",
        "",
        SCENARIO_HEADER,
        "|" + "---|" * SCENARIO_HEADER.count(" | ") + "---|",
        *[scenario_row(result, ingest_cpu_share(results)) for result in results],
    ]
    profiled = [result for result in results if result.clients]
    if profiled:
        lines += [
            "",
            f"Median latency (ms) of the events emitted in each {PROFILE_SLICES}th of the window:",
            "",
            "| scenario | clients | " + " | ".join(str(n + 1) for n in range(PROFILE_SLICES)) + " |",
            "|---|---|" + "---|" * PROFILE_SLICES,
            *[
                f"| {result.kind} | {result.clients} | "
                + " | ".join(_ms(value) for value in result.profile_ms(PROFILE_SLICES))
                + " |"
                for result in profiled
            ],
        ]
    per_member = per_member_rows(results)
    if per_member:
        lines += [
            "",
            "Relay CPU per member for delivery (the `ingest only` share taken off), against today's plain poll "
            "every 3 s with the same clients:",
            "",
            "| scenario | clients | CPU ms per s per member | ÷ poll | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
            *per_member,
        ]
    ratios = ratio_rows(results)
    if ratios:
        lines += [
            "",
            "SSE ÷ long-poll, same client count:",
            "",
            "| clients | relay CPU per event | of it delivery | relay CPU total | relay RSS | RSS per client | p50 | p99 |",
            "|---|---|---|---|---|---|---|---|",
            *ratios,
        ]
    return "\n".join(lines) + "\n"


def run_and_write(main: Callable[[Any, str], Awaitable[str]], args: Any, output: str) -> int:
    """`main(args, command)` under trio; its report printed, and written to `output` unless "-"."""
    command = shlex.join([os.path.relpath(sys.executable), *sys.orig_argv[1:]])
    text = trio.run(main, args, command)
    print(text)
    if output != "-":
        Path(output).write_text(text)
        print(f"written to {output}", file=sys.stderr)
    return 0
