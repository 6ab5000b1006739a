"""Where the relay's memory goes: tracemalloc snapshots taken inside the relay, compared in the benchmark.

With `--tracemalloc`, the relay starts tracing at start-up (set-up code run by the GC probe's
`sitecustomize`) and dumps a snapshot whenever it gets SIGUSR1; the benchmark takes one before the
clients (or factions) come and one once they are settled, and lists what grew, per client or faction,
by source line and by file. tracemalloc sees the Python allocators only, not SQLite's or the kernel's
own, and its bookkeeping makes the relay larger: RSS figures of such a run are not the goal's figures.
"""

from __future__ import annotations

import signal
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.processes import Relay

SNAPSHOT_TIMEOUT_S = 120.0  # a snapshot of a relay holding 10,000 clients takes a few seconds
CHECK_EVERY_S = 0.2
TOP_LINES = 15
TOP_FILES = 10
FRAMES = 16  # enough to reach, from a leaf deep in trio, the relay's or the server's code that caused it
# The code an allocation is charged to in the *caller* table: the innermost frame in the relay, else the
# innermost in one of the libraries it runs on, so that trio's internals are charged to who called them.
OWNERS = (
    "/relay/",
    "/hypercorn/",
    "/quart/",
    "/trio_websocket/",
    "/httpx/",
    "/httpcore/",
    "/h11/",
    "/wsproto/",
)
ROOT = "/relay/cli.py"  # where `trio.run` is called: in every task's traceback, so it says nothing


def setup_code(directory: Path) -> str:
    """Run in the relay at start-up: trace, and dump a numbered snapshot on SIGUSR1 (written under a
    temporary name, then renamed, so that a snapshot file is complete once it exists)."""
    return (
        "import os, signal, tracemalloc\n"
        f"tracemalloc.start({FRAMES})\n"
        "_taken = [0]\n"
        "def _dump(signum, frame):\n"
        "    _taken[0] += 1\n"
        f"    path = os.path.join({str(directory)!r}, f'snapshot-{{_taken[0]}}')\n"
        "    tracemalloc.take_snapshot().dump(path + '.partial')\n"
        "    os.rename(path + '.partial', path)\n"
        "signal.signal(signal.SIGUSR1, _dump)\n"
    )


class Snapshots:
    """The snapshots of one relay, asked for in order."""

    def __init__(self, relay: Relay, directory: Path) -> None:
        self._relay = relay
        self._directory = directory
        self._taken = 0

    async def take(self) -> tracemalloc.Snapshot:
        self._taken += 1
        path = self._directory / f"snapshot-{self._taken}"
        self._relay.process.send_signal(signal.SIGUSR1)
        with trio.fail_after(SNAPSHOT_TIMEOUT_S):
            while not path.exists():  # noqa: ASYNC110 -- the relay writes a file; there is no event to wait on
                await trio.sleep(CHECK_EVERY_S)
        return await trio.to_thread.run_sync(tracemalloc.Snapshot.load, str(path))


Row = tuple[str, int, int]  # (where, bytes grown, blocks grown)


@dataclass(frozen=True)
class Growth:
    """What grew between two snapshots, per unit (client or faction), biggest first."""

    unit: str
    units: int
    traced_bytes: int  # all traced memory grown
    lines: list[Row]  # by the line that allocated
    callers: list[Row]  # by the relay's (or the server's) line that led to the allocation
    files: list[Row]  # by the file that allocated

    def render(self, title: str) -> list[str]:
        per_unit = self.traced_bytes / self.units
        lines = [
            f"### {title}",
            "",
            f"Python-allocated memory grown: {self.traced_bytes / 1024:,.0f} KB, "
            f"{per_unit:,.0f} bytes per {self.unit}.",
        ]
        for heading, rows in (
            ("allocating line", self.lines),
            ("charged to (innermost relay, else server, frame)", self.callers),
            ("allocating file", self.files),
        ):
            lines += ["", f"| {heading} | bytes per {self.unit} | blocks per {self.unit} |", "|---|---|---|"]
            lines += [
                f"| `{where}` | {size / self.units:,.0f} | {count / self.units:.2f} |"
                for where, size, count in rows
            ]
        return lines


def short(filename: str) -> str:
    """A path from the package down: `site-packages/h11/_state.py` -> `h11/_state.py`. (`<string>` is
    code made by exec, such as a dataclass's generated `__init__`.)"""
    for marker in ("site-packages/", "/lib/python3"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return filename.split("/main/", 1)[-1]


def growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, unit: str, units: int) -> Growth:
    def top(key: str, limit: int) -> list[Row]:
        stats = [stat for stat in after.compare_to(before, key) if stat.size_diff > 0][:limit]
        rows = []
        for stat in stats:
            frame = stat.traceback[0]
            where = short(frame.filename) + (f":{frame.lineno}" if key == "lineno" else "")
            rows.append((where, stat.size_diff, stat.count_diff))
        return rows

    traced = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return Growth(
        unit, units, traced, top("lineno", TOP_LINES), by_caller(before, after), top("filename", TOP_FILES)
    )


def owner(traceback: tracemalloc.Traceback) -> str:
    """Where an allocation is charged: see OWNERS."""
    frames = [frame for frame in reversed(list(traceback)) if ROOT not in frame.filename]  # newest first
    for marker in OWNERS:
        for frame in frames:
            if marker in frame.filename:
                return f"{short(frame.filename)}:{frame.lineno}"
    leaf = frames[0] if frames else traceback[0]
    return f"{short(leaf.filename)}:{leaf.lineno}"


def by_caller(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[Row]:
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        where = owner(stat.traceback)
        sizes[where] += stat.size_diff
        counts[where] += stat.count_diff
    return [(where, size, counts[where]) for where, size in sizes.most_common(TOP_LINES) if size > 0]
