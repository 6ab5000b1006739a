"""Start-up of a relay that already serves factions: time to the first `GET /ping`, and to every socket live.

The database is seeded through the relay's own store API (`open_store`, `subscribe`,
`append_events`): each faction active, with a full retention of realistic war-call INSERTs, and so as
many stored faction rows. Each repetition copies it into a fresh folder and starts `relay serve` on
a port chosen beforehand, so that a prober can knock from the moment the process is spawned: a fresh
connection with `GET /ping` every 10 ms until one is answered 200. Then `/status` is read until every
faction's upstream socket is live; the time of the last one comes from its `connected_since` (the
relay's wall clock, ms), not from how often `/status` was read.

Once live, each faction reconciles its stored rows with the fake upstream's REST tables, which are
empty: every seeded row becomes a DELETE resync event. That work overlaps the paced joins of later
factions, as a real restart's reconciles do, though a real upstream would mostly agree.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trio

from bench.clients import CLIENT_ERRORS, Connection, Target, request
from bench.ingest import change
from bench.memory import report_warnings, wait_factions
from bench.processes import Upstream, open_relay, rss_bytes
from relay.config import RetentionConfig, UpstreamConfig
from relay.storage.store import open_store

PROBE_EVERY_S = 0.01
PROBE_CONNECT_TIMEOUT_S = 1.0
PING_DEADLINE_S = 30.0  # the relay's import and database load, however slow
STATUS_EVERY_S = 0.25  # /status builds a document of every faction: not too often
LIVE_SLACK_S = 60.0  # beyond the joins' pacing, for every socket to come up
IMPORT_RUNS = 5
# Timed inside the child, so that the interpreter's own start and exit are left out.
IMPORT = "import time; t = time.perf_counter(); import relay.cli; print(time.perf_counter() - t)"
LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")  # logging's asctime


@dataclass(frozen=True)
class StartupRun:
    ping_s: float  # spawn to the first /ping answered 200
    imported_s: float  # spawn to the relay's first log line (after its imports and config), its own stamp
    listening_s: float  # spawn to the relay's "listening on" line, its own stamp
    first_live_s: float  # spawn to the first faction's upstream socket live
    all_live_s: float  # spawn to the last one
    probes: int  # /ping attempts until the first 200
    rss_bytes: int  # once every socket is live
    reconciled: int  # factions whose first reconcile had completed when the last socket went live
    resync_events: int  # the DELETE resyncs those reconciles stored


def default_retention() -> int:
    return RetentionConfig().events_per_faction


def default_upstream() -> UpstreamConfig:
    """The relay's defaults for the upstream: its channels (and their key columns), its join pacing."""
    return UpstreamConfig(url="ws://127.0.0.1/", anon_key="")


async def seed(path: Path, factions: Sequence[int], events_per_faction: int) -> None:
    """Every faction active, with `events_per_faction` war-call INSERTs (~400 bytes each) and their rows."""
    async with open_store(
        path,
        retention=RetentionConfig(events_per_faction=events_per_faction),
        key_columns=default_upstream().key_columns,
    ) as store:
        for faction_id in factions:
            await store.subscribe(faction_id)
            await store.append_events(faction_id, [change(faction_id, n) for n in range(events_per_faction)])


def free_port() -> int:
    """A port free now, so that the prober knows where to knock before the relay has said where it listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def probe_ping(target: Target) -> tuple[float, int]:
    """A fresh connection and `GET /ping` every PROBE_EVERY_S until a 200; when (monotonic), and how many tries."""
    message = request(target, "/ping", "Connection: close")
    with trio.fail_after(PING_DEADLINE_S):
        for attempt in range(1, int(PING_DEADLINE_S / PROBE_EVERY_S) + 1):
            due = trio.current_time() + PROBE_EVERY_S
            try:
                with trio.fail_after(PROBE_CONNECT_TIMEOUT_S):
                    async with await trio.open_tcp_stream(target.host, target.port) as stream:
                        await stream.send_all(message)
                        head = await Connection(stream).read_head()
                if head.status == 200:
                    return time.monotonic(), attempt
            except CLIENT_ERRORS:
                pass  # refused: not listening yet
            await trio.sleep_until(due)
    raise RuntimeError(f"/ping never answered 200 within {PING_DEADLINE_S:g} s")


def bytecode_cache(directory: Path) -> dict[str, str]:
    """Environment for a child Python that keeps its compiled bytecode in `directory`, as an installed relay
    has it (`pip install .` compiles every module). Without it, an editable install run under
    PYTHONDONTWRITEBYTECODE=1 compiles the relay's own modules at every start."""
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(directory)}


async def measure_startup(
    upstream: Upstream, seeded: Path, factions: int, work_dir: Path, env: dict[str, str]
) -> StartupRun:
    """One `relay serve` from a copy of the seeded database, timed from its spawn."""
    shutil.copy(seeded, work_dir / "relay.db")  # closed by the store: checkpointed, no -wal left
    port = free_port()
    target = Target("127.0.0.1", port, trio.CapacityLimiter(1))
    async with trio.open_nursery() as nursery:
        pinged: list[tuple[float, int]] = []

        async def probe() -> None:
            pinged.append(await probe_ping(target))

        spawned, spawned_wall_ms = time.monotonic(), time.time_ns() / 1e6
        nursery.start_soon(probe)
        async with open_relay(upstream.url, work_dir, gc_probe=False, port=port, env=env) as relay:
            logged = [logged_at_ms(line) for line in relay.log_tail]
            stamps = [stamp for stamp in logged if stamp is not None]  # the tail ends with "listening on"
            budget_s = 2 * factions / default_upstream().joins_per_second + LIVE_SLACK_S
            entries = await wait_factions(
                target, factions, budget_s, reconciled=False, every_s=STATUS_EVERY_S
            )
            rss = rss_bytes(relay.pid)
            report_warnings(relay)
    connected = [entry["upstream"]["connected_since"] for entry in entries]
    reconciles = [entry["reconcile"] for entry in entries if entry["reconcile"]["reconciles"]]
    return StartupRun(
        ping_s=pinged[0][0] - spawned,
        imported_s=(stamps[0] - spawned_wall_ms) / 1000,
        listening_s=(stamps[-1] - spawned_wall_ms) / 1000,
        first_live_s=(min(connected) - spawned_wall_ms) / 1000,
        all_live_s=(max(connected) - spawned_wall_ms) / 1000,
        probes=pinged[0][1],
        rss_bytes=rss,
        reconciled=len(reconciles),
        resync_events=sum(reconcile["differences"] or 0 for reconcile in reconciles),
    )


def logged_at_ms(line: str) -> float | None:
    """The wall-clock time (ms) a relay log line carries: `2026-11-24 22:54:23,537 INFO ...`, local time."""
    match = LOG_TIME.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000


def import_times(cache: dict[str, str], runs: int = IMPORT_RUNS) -> dict[str, list[float]]:
    """Seconds: the wall time of `python -c pass` (the interpreter's start and exit), and the time
    `import relay.cli` takes inside the interpreter, with the bytecode `cache` (filled by one uncounted
    import) and as this environment runs it; interleaved."""
    cached = {**os.environ, **cache}
    series: dict[str, list[float]] = {"bare": [], "cached": [], "as is": []}
    subprocess.run([sys.executable, "-c", IMPORT], check=True, timeout=60, env=cached)
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        series["bare"].append(time.monotonic() - started)
        for name, env in (("cached", cached), ("as is", None)):
            timed = subprocess.run(
                [sys.executable, "-c", IMPORT],
                check=True,
                timeout=60,
                env=env,
                capture_output=True,
                text=True,
            )
            series[name].append(float(timed.stdout))
    return series


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 0) -> str:
    """`median (min-max)`, each times `scale`."""
    median, low, high = (value * scale for value in (statistics.median(values), min(values), max(values)))
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
