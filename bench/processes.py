"""The benchmark's two child processes (the relay, the fake upstream) and what /proc says about them.

Each child is owned by an async context manager that stops it on the way out, also when the
benchmark is cancelled: the relay gets SIGTERM (its clean shutdown), the upstream the end of its
stdin; either is killed if it has not exited within a bounded, shielded wait.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.upstream import ANON_KEY

REPOSITORY = Path(__file__).resolve().parent.parent  # where `python -m bench.upstream` finds `bench`
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0  # the relay's graceful shutdown is bounded by 2 s of hypercorn drain, then closes
LOG_LINES_KEPT = 200
LISTENING = re.compile(r"listening on (http://\S+)")
# Loaded into the relay process only (as `sitecustomize`, through PYTHONPATH): logs every full
# collection and every collection over 5 ms, because a stop-the-world collection stalls every
# request at once and shows as a latency tail that CPU figures alone do not explain. It can also run
# a line of set-up code (`--relay-setup`), to try a tuning without touching the relay.
GC_PROBE = """\
import gc, os, time
if os.environ.get("BENCH_RELAY_SETUP"):
    exec(os.environ["BENCH_RELAY_SETUP"], {})
_path = os.environ.get("BENCH_RELAY_GC_LOG")
if _path:
    _log = open(_path, "a", buffering=1)
    _started = [0]

    def _observe(phase, info):
        if phase == "start":
            _started[0] = time.time_ns()
            return
        took = time.time_ns() - _started[0]
        if info["generation"] == 2 or took > 5_000_000:
            _log.write(f"{_started[0]} {info['generation']} {took}\\n")

    gc.callbacks.append(_observe)
"""
RELAY_TOML = """\
# Written by the benchmark (bench/processes.py); the upstream URL, key, port and database path come from RELAY_* variables.
[server]
host = "127.0.0.1"
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of `pid` so far (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ", fields start at 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def stop_process(process: trio.Process, graceful: signal.Signals | None) -> None:
    """Ask (a signal, or nothing when closing stdin is the request), wait a bounded time, then kill."""
    with trio.CancelScope(shield=True):
        if graceful is not None and process.returncode is None:
            process.send_signal(graceful)
        with trio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            if buffer:
                yield buffer.decode(errors="replace")
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")


@dataclass
class Upstream:
    """The fake Supabase process (bench/upstream.py), spoken to one line at a time."""

    process: trio.Process
    url: str
    replies: AsyncIterator[str]
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        async with self.lock:
            await self.process.stdin.send_all(f"{command}\n".encode())
            with trio.fail_after(START_TIMEOUT_S):
                return json.loads(await anext(self.replies))

    async def count(self, from_ns: int, to_ns: int) -> dict[int, int]:
        counts = await self.ask(f"count {from_ns} {to_ns}")
        return {int(faction_id): n for faction_id, n in counts.items()}


def open_upstream(
    first_faction: int, factions: int, interval_s: float
) -> AbstractAsyncContextManager[Upstream]:
    """bench/upstream.py: the fake Supabase emitting one INSERT per faction every `interval_s`."""
    arguments = [f"--first-faction={first_faction}", f"--factions={factions}", f"--interval-s={interval_s}"]
    return open_upstream_process(["bench.upstream", *arguments])


@asynccontextmanager
async def open_upstream_process(module_and_arguments: list[str]) -> AsyncIterator[Upstream]:
    """A fake upstream module (`python -m ...`) that prints `url ...` first, then answers one command
    line with one line; stopped by the end of its stdin (then killed) on every way out."""
    command = [sys.executable, "-m", *module_and_arguments]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPOSITORY)
    )
    try:
        assert process.stdout is not None
        replies = read_lines(process.stdout)
        with trio.fail_after(START_TIMEOUT_S):
            first = await anext(replies, "")
        if not first.startswith("url "):
            raise RuntimeError(
                f"{module_and_arguments[0]} said {first!r} instead of its url (its stderr is above)"
            )
        yield Upstream(process, first.removeprefix("url "), replies)
    finally:
        if process.stdin is not None:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()  # the upstream exits at the end of its stdin
        await stop_process(process, None)


@dataclass(frozen=True)
class GcPause:
    started_ns: int
    generation: int
    took_ns: int


@dataclass
class Relay:
    process: trio.Process
    url: str
    log_tail: deque[str]
    warnings: list[str]
    gc_log: Path | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def gc_pauses(self, from_ns: int, to_ns: int) -> list[GcPause]:
        """The collections the probe logged that started inside [from_ns, to_ns)."""
        if self.gc_log is None or not self.gc_log.exists():
            return []
        pauses = []
        for line in self.gc_log.read_text().splitlines():
            started, generation, took = (int(word) for word in line.split())
            if from_ns <= started < to_ns:
                pauses.append(GcPause(started, generation, took))
        return pauses


def relay_environ(
    upstream_url: str, data_dir: Path, gc_log: Path | None, setup: str | None, port: int = 0
) -> Mapping[str, str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    environ.update(
        RELAY_UPSTREAM_URL=upstream_url,
        RELAY_UPSTREAM_ANON_KEY=ANON_KEY,
        RELAY_STORAGE_PATH=str(data_dir / "relay.db"),
        RELAY_SERVER_PORT=str(port),
    )
    if gc_log is not None:
        probe = data_dir / "gc_probe"
        probe.mkdir(exist_ok=True)
        (probe / "sitecustomize.py").write_text(GC_PROBE)
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), environ.get("PYTHONPATH")]))
        environ["BENCH_RELAY_GC_LOG"] = str(gc_log)
        if setup:
            environ["BENCH_RELAY_SETUP"] = setup
    return environ


@asynccontextmanager
async def open_relay(
    upstream_url: str,
    data_dir: Path,
    *,
    gc_probe: bool,
    setup: str | None = None,
    extra_config: str = "",
    port: int = 0,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Relay]:
    """`relay serve` from this interpreter's bin folder, with the database `data_dir/relay.db` (a fresh
    one unless the caller put one there). `extra_config` is TOML appended to the config file (whole
    tables, such as `[limits]`); `port` 0 lets the relay pick one; `env` adds to (or overrides) the
    relay's environment."""
    config = data_dir / "relay.toml"
    config.write_text(RELAY_TOML + extra_config)
    gc_log = data_dir / "relay-gc.log" if gc_probe else None
    environ = {**relay_environ(upstream_url, data_dir, gc_log, setup, port), **(env or {})}
    command = [str(Path(sys.executable).parent / "relay"), "serve", "--config", str(config)]
    process = await trio.lowlevel.open_process(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=environ
    )
    try:
        assert process.stderr is not None
        lines = read_lines(process.stderr)
        tail: deque[str] = deque(maxlen=LOG_LINES_KEPT)
        with trio.fail_after(START_TIMEOUT_S):
            async for line in lines:
                tail.append(line)
                if match := LISTENING.search(line):
                    break
            else:
                raise RuntimeError("relay serve exited before listening:\n" + "\n".join(tail))
        relay = Relay(process, match.group(1), tail, [], gc_log)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_log, lines, relay)
            try:
                yield relay
            finally:
                await stop_process(process, signal.SIGTERM)
                nursery.cancel_scope.cancel()
    finally:
        await stop_process(process, signal.SIGTERM)


async def drain_log(lines: AsyncIterator[str], relay: Relay) -> None:
    """Keep reading the relay's stderr (a full pipe would stall it), keeping the tail and the warnings."""
    async for line in lines:
        relay.log_tail.append(line)
        if (" WARNING " in line or " ERROR " in line) and len(relay.warnings) < LOG_LINES_KEPT:
            relay.warnings.append(line)
