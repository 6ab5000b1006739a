"""Ingest benchmark: upstream changes committed durably (synchronous=FULL) per second, through the store.

Side by side in one run, interleaved, several repetitions:

- *per-change*: one appender, one change per append, so every change is its own transaction and
  fsync: what the relay did before group commit.
- *group*: one appender per faction (100), each appending its next change as soon as the previous one
  is committed, as each faction's upstream reader does; the committer puts everything that arrived
  during one commit into the next.

Each change is a realistic `postgres_changes` INSERT of ~400 bytes on a tracked table, so the faction
rows are written too. Writes `bench/RESULTS-ingest.md` (none with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.report import machine_lines
from relay.config import RetentionConfig
from relay.storage.store import open_store

FACTIONS = 100


@dataclass(frozen=True)
class Run:
    mode: str
    changes: int
    commits: int
    elapsed_s: float
    latencies_ms: list[float]

    @property
    def per_s(self) -> float:
        return self.changes / self.elapsed_s

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def change(faction_id: int, n: int) -> tuple[str, dict[str, object]]:
    row = {
        "id": faction_id * 10_000_000 + n,
        "faction_id": faction_id,
        "war_id": 77,
        "target_id": 2_000_000 + n,
        "target_name": "Target name here",
        "caller_id": 1_000_000 + n,
        "caller_name": "Caller name here",
        "created_at": "2026-11-24T20:00:00.000+00:00",
    }
    data: dict[str, object] = {
        "schema": "public",
        "table": "war_calls",
        "commit_timestamp": "2026-11-24T20:00:00.000Z",
        "eventType": "INSERT",
        "new": row,
        "old": {},
        "errors": None,
    }
    return "postgres_changes", data


async def measure(mode: str, duration_s: float, directory: Path) -> Run:
    latencies: list[float] = []
    counts = [0]
    async with open_store(
        directory / f"{mode}.db",
        retention=RetentionConfig(events_per_faction=100),
        key_columns={"war_calls": "id"},
    ) as store:
        before = store.statistics().group_commits

        async def appender(factions: Sequence[int]) -> None:
            n = 0
            while True:
                for faction_id in factions:
                    n += 1
                    started = trio.current_time()
                    await store.append_events(faction_id, [change(faction_id, n)])
                    latencies.append((trio.current_time() - started) * 1000)
                    counts[0] += 1

        started = trio.current_time()
        with trio.move_on_after(duration_s):
            async with trio.open_nursery() as nursery:
                if mode == "per-change":
                    nursery.start_soon(appender, range(1, FACTIONS + 1))
                else:
                    for faction_id in range(1, FACTIONS + 1):
                        nursery.start_soon(appender, [faction_id])
        elapsed = trio.current_time() - started
        commits = store.statistics().group_commits - before
    return Run(mode, counts[0], commits, elapsed, latencies)


async def main(repetitions: int, duration_s: float) -> list[Run]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="cat-relay-ingest-") as temporary:
        for repetition in range(repetitions):
            for mode in ("per-change", "group") if repetition % 2 == 0 else ("group", "per-change"):
                directory = Path(temporary) / f"{repetition}"
                directory.mkdir(exist_ok=True)
                run = await measure(mode, duration_s, directory)
                print(
                    f"{mode}: {run.per_s:,.0f} changes/s, {run.commits} commits, p99 {run.percentile_ms(0.99):.1f} ms",
                    file=sys.stderr,
                )
                runs.append(run)
    return runs


def render(runs: Sequence[Run], command: str) -> str:
    lines = ["# Ingest: upstream changes committed durably per second", ""]
    lines += [f"- {line}" for line in machine_lines()]
    lines += [f"- Command: `{command}`", ""]
    lines += [(__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    lines += [
        "| mode | runs | changes/s median (min-max) | changes per commit | append p50 ms | append p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    by_mode = {mode: [run for run in runs if run.mode == mode] for mode in ("per-change", "group")}
    for mode, mode_runs in by_mode.items():
        rates = [run.per_s for run in mode_runs]
        per_commit = statistics.median(run.changes / max(run.commits, 1) for run in mode_runs)
        lines.append(
            f"| {mode} | {len(mode_runs)} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
            f"| {per_commit:.1f} | {statistics.median(r.percentile_ms(0.5) for r in mode_runs):.1f} "
            f"| {statistics.median(r.percentile_ms(0.99) for r in mode_runs):.1f} |"
        )
    group = statistics.median(run.per_s for run in by_mode["group"])
    single = statistics.median(run.per_s for run in by_mode["per-change"])
    lines += ["", f"Group commit ÷ per-change commit: {group / single:.1f}x the changes per second."]
    return "\n".join(lines) + "\n"


def run_cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.ingest", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repetitions", type=int, default=6)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 2 s; writes nothing")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS-ingest.md"))
    args = parser.parse_args(argv)
    repetitions, duration = (2, 2.0) if args.quick else (args.repetitions, args.duration_s)
    runs = trio.run(main, repetitions, duration)
    text = render(
        runs, " ".join([".venv/bin/python -m bench.ingest", *(sys.argv[1:] if argv is None else argv)])
    )
    print(text)
    if not args.quick:
        args.output.write_text(text)
        print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    run_cli()
