"""The relay's memory and CPU as /proc shows them, sampled through the phases of a load
(`relay.testing.worst_case`): each phase's RSS at start, peak and end, its time, and the CPU of the
relay and of the process driving the load."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

SAMPLE_EVERY_S = 0.1
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of `pid` so far (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ", fields start at 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


@dataclass
class Phase:
    name: str
    started_rss: int
    peak_rss: int
    ended_rss: int = 0
    seconds: float = 0.0
    relay_cpu_s: float = 0.0
    driver_cpu_s: float = 0.0  # this process's: the load, and the fake upstream when it runs here


@dataclass
class RssSampler:
    """The relay's RSS every SAMPLE_EVERY_S, its peak charged to the phase under way; each phase's
    time and CPU. `on_phase` hears each phase as it ends (a bench prints progress with it)."""

    pid: int
    on_phase: Callable[[Phase], None] = lambda phase: None
    phases: list[Phase] = field(default_factory=list)
    stopped_above: int | None = None  # the RSS passed this: the load is to stop
    _started: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def begin(self, name: str) -> None:
        self.close()
        self.phases.append(Phase(name, rss_bytes(self.pid), rss_bytes(self.pid)))
        self._started = (trio.current_time(), cpu_seconds(self.pid), time.process_time())

    def close(self) -> None:
        """End the phase under way, if one is."""
        if not self.phases or self.phases[-1].seconds:
            return
        phase, (started_at, relay_cpu, driver_cpu) = self.phases[-1], self._started
        phase.ended_rss = rss_bytes(self.pid)
        phase.peak_rss = max(phase.peak_rss, phase.ended_rss)
        phase.seconds = trio.current_time() - started_at
        phase.relay_cpu_s = cpu_seconds(self.pid) - relay_cpu
        phase.driver_cpu_s = time.process_time() - driver_cpu
        self.on_phase(phase)

    @property
    def peak(self) -> int:
        return max((phase.peak_rss for phase in self.phases), default=0)

    def sample(self) -> None:
        if self.phases:
            self.phases[-1].peak_rss = max(self.phases[-1].peak_rss, rss_bytes(self.pid))

    async def run(
        self, stop_above_bytes: int | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sample until cancelled; once the RSS is over `stop_above_bytes` (if given), say so in
        `stopped_above`, for the load to stop."""
        task_status.started()
        while True:
            self.sample()
            if stop_above_bytes is not None and self.peak > stop_above_bytes:
                self.stopped_above = stop_above_bytes
            await trio.sleep(SAMPLE_EVERY_S)
