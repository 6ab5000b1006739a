"""One wrk run (Debian's wrk 4.1.0) against one server, and what it reported.

The figures come from the `shortpoll-summary {json}` line that `bench/wrk/shortpoll.lua` prints in
its `done()`: requests, duration, errors by kind, latency percentiles in µs. A run with any socket
error or any non-2xx/3xx answer is a failure (`WrkFailed`), never a figure.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.processes import CLOCK_TICKS_PER_S, cpu_seconds

SUMMARY_PREFIX = "shortpoll-summary "
WRK_TIMEOUT_MARGIN_S = 30.0  # beyond -d: wrk's start, its last requests (2 s timeout), its report
LUA_SCRIPT = Path(__file__).resolve().parent / "wrk" / "shortpoll.lua"


class WrkFailed(Exception):
    """wrk did not run, or reported socket errors or non-2xx answers."""


@dataclass(frozen=True)
class WrkRun:
    server: str
    repetition: int  # 0 for the warm-up
    requests: int
    duration_s: float
    bytes_read: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    elapsed_s: float  # wall time around the wrk process
    started_ns: int  # time.time_ns() at its start and end, to find the server's GC pauses in it
    ended_ns: int
    server_cpu_s: float  # the server process, all threads, over `elapsed_s`
    idle_cpu_s: dict[str, float]  # the other servers over the same time: they should be idle
    wrk_cpu_s: float
    # The server's CPU over the same time (/proc/stat): busy with anything else (other processes on a
    # shared machine, interrupts), and stolen by the hypervisor. None without pinning.
    others_on_cpu_s: float | None
    steal_s: float | None

    @property
    def per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def per_cpu_s(self) -> float:
        """Requests per second of the server's own CPU: the figure a busy shared core disturbs least."""
        return self.requests / self.server_cpu_s if self.server_cpu_s else 0.0

    @property
    def server_cpu_share(self) -> float:
        return self.server_cpu_s / self.elapsed_s

    @property
    def wrk_cpu_share(self) -> float:
        return self.wrk_cpu_s / self.elapsed_s


def wrk_command(
    url: str, paths_file: Path, *, connections: int, duration_s: float, cpu: int | None
) -> list[str]:
    wrk = shutil.which("wrk") or "wrk"
    command = [wrk, "-t1", f"-c{connections}", f"-d{math.ceil(duration_s)}s", "--latency"]
    command += ["-s", str(LUA_SCRIPT), url, "--", str(paths_file)]
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else command


def cpu_times(cpu: int | None) -> tuple[float, float] | None:
    """Seconds `cpu` has been busy (user, nice, system, irq, softirq) and stolen, from /proc/stat."""
    if cpu is None:
        return None
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(n) for n in line.split()[1:9])
            return (user + nice + system + irq + softirq) / CLOCK_TICKS_PER_S, steal / CLOCK_TICKS_PER_S
    raise RuntimeError(f"no cpu{cpu} line in /proc/stat")


def _children_cpu_s() -> float:
    """CPU of this process's waited-for children: wrk's, once it has been reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_wrk(
    server: str,
    repetition: int,
    command: Sequence[str],
    duration_s: float,
    server_pid: int,
    idle_pids: dict[str, int],
    core: int | None,
) -> WrkRun:
    """Run `command` (a wrk_command) and measure the server's CPU, and its `core`, around it."""
    cpu_before = cpu_times(core)
    idle_before = {name: cpu_seconds(pid) for name, pid in idle_pids.items()}
    server_before, children_before = cpu_seconds(server_pid), _children_cpu_s()
    started, started_ns = time.monotonic(), time.time_ns()
    with trio.fail_after(duration_s + WRK_TIMEOUT_MARGIN_S):
        done = await trio.run_process(list(command), capture_stdout=True, capture_stderr=True, check=False)
    elapsed, ended_ns = time.monotonic() - started, time.time_ns()
    server_cpu = cpu_seconds(server_pid) - server_before
    idle_cpu = {name: cpu_seconds(pid) - idle_before[name] for name, pid in idle_pids.items()}
    wrk_cpu = _children_cpu_s() - children_before
    cpu_after = cpu_times(core)
    others = steal = None
    if cpu_before is not None and cpu_after is not None:
        others = cpu_after[0] - cpu_before[0] - server_cpu
        steal = cpu_after[1] - cpu_before[1]
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise WrkFailed(
            f"wrk against {server} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    summary = _summary(output, server)
    errors = summary["errors"]
    socket_errors = {kind: n for kind, n in errors.items() if kind != "status" and n}
    if socket_errors or errors["status"]:
        raise WrkFailed(
            f"wrk against {server}: socket errors {socket_errors or 0}, non-2xx/3xx answers "
            f"{errors['status']} of {summary['requests']}:\n{output}"
        )
    if not summary["requests"]:
        raise WrkFailed(f"wrk against {server} completed no request:\n{output}")
    latency = summary["latency_us"]
    return WrkRun(
        server=server,
        repetition=repetition,
        requests=summary["requests"],
        duration_s=summary["duration_us"] / 1e6,
        bytes_read=summary["bytes"],
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        elapsed_s=elapsed,
        started_ns=started_ns,
        ended_ns=ended_ns,
        server_cpu_s=server_cpu,
        idle_cpu_s=idle_cpu,
        wrk_cpu_s=wrk_cpu,
        others_on_cpu_s=others,
        steal_s=steal,
    )


def _summary(output: str, server: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            summary: dict[str, Any] = json.loads(line.removeprefix(SUMMARY_PREFIX))
            return summary
    raise WrkFailed(f"wrk against {server} printed no {SUMMARY_PREFIX.strip()} line:\n{output}")
