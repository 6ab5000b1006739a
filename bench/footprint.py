"""Footprint benchmark: the relay's memory per held client and per idle faction, and its start-up time.

Three parts, each against fresh `relay serve` processes and one quiet fake upstream (bench/upstream.py
emitting nothing, so held clients stay held):

- clients: RSS per held long-poll (`GET /events?...&wait=25`, re-requested when answered) and per SSE
  stream, at 1,000 / 5,000 / 10,000 clients over 100 live factions;
- factions: RSS per subscribed, live, reconciled, idle faction at 100 / 500 / 1,000 factions;
- start-up: with 150 active factions stored, each holding a full retention of events, the time from
  spawning `relay serve` to the first `GET /ping` answered 200, and to the last upstream socket live.

    .venv/bin/python -m bench.footprint            # about eight minutes; writes bench/RESULTS-footprint.md
    .venv/bin/python -m bench.footprint --quick    # a smoke run: small counts, prints, writes nothing
    .venv/bin/python -m bench.footprint --parts clients --kinds sse --clients 10000
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

if __package__ in (None, ""):  # run as `python bench/footprint.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.delivery import pin, raise_open_files_limit
from bench.footprint_report import Results, render
from bench.memory import (
    SUBSCRIBES_IN_FLIGHT,
    ClientFootprint,
    FactionFootprint,
    Settings,
    measure_clients,
    measure_factions,
)
from bench.processes import open_upstream
from bench.report import machine_lines
from bench.startup import (
    StartupRun,
    bytecode_cache,
    default_retention,
    default_upstream,
    import_times,
    measure_startup,
    seed,
)

FIRST_FACTION = 46001
QUIET_INTERVAL_S = 1e9  # the fake upstream's interval between changes: none in a run
PARTS = ("clients", "factions", "startup")
KINDS = ("longpoll", "sse")


@dataclass(frozen=True)
class Plan:
    parts: Sequence[str]
    kinds: Sequence[str]
    clients: Sequence[int]
    client_factions: int
    factions: Sequence[int]
    joins_per_second: float
    startup_factions: int
    startup_runs: int
    events_per_faction: int
    hold_s: float
    wait_s: float
    connect_concurrency: int
    pin: bool
    tracemalloc: bool

    @property
    def files_needed(self) -> int:
        """Open files this process holds at once: one socket per client, plus set-up's."""
        return max([0, *self.clients]) + 200 if "clients" in self.parts else 200


@dataclass
class Collected:
    clients: list[ClientFootprint] = field(default_factory=list)
    factions: list[FactionFootprint] = field(default_factory=list)
    startup: list[StartupRun] = field(default_factory=list)
    first_start: StartupRun | None = None  # uncounted: compiled the bytecode
    imports: dict[str, list[float]] | None = None


def say(text: str) -> None:
    print(f"footprint: {text}", file=sys.stderr, flush=True)


async def run_plan(plan: Plan, collected: Collected) -> None:
    async with open_upstream(FIRST_FACTION, plan.client_factions, QUIET_INTERVAL_S) as upstream:
        place: Callable[[int], None] = (
            (lambda relay_pid: pin(relay_pid, upstream.pid)) if plan.pin else (lambda relay_pid: None)
        )
        settings = Settings(
            upstream,
            plan.joins_per_second,
            plan.hold_s,
            plan.wait_s,
            plan.connect_concurrency,
            place,
            tracemalloc=plan.tracemalloc,
        )
        if "clients" in plan.parts:
            factions = range(FIRST_FACTION, FIRST_FACTION + plan.client_factions)
            for n in plan.clients:  # the kinds interleaved at each count
                for kind in plan.kinds:
                    result = await measure_clients(kind, n, factions, settings)
                    collected.clients.append(result)
                    say(
                        f"{kind} N={n}: RSS {result.before.memory.rss >> 20} -> {result.held.memory.rss >> 20} MB, "
                        f"{(result.held.memory.rss - result.before.memory.rss) / n / 1024:.1f} KB/client, "
                        f"{result.held_sockets} held, ramp {result.ramp_s:.1f} s, errors {dict(result.errors) or 0}"
                    )
        if "factions" in plan.parts:
            for n in plan.factions:
                faction_result = await measure_factions(range(FIRST_FACTION, FIRST_FACTION + n), settings)
                collected.factions.append(faction_result)
                grown = faction_result.live.memory.rss - faction_result.before.memory.rss
                say(
                    f"factions N={n}: {grown / n / 1024:.1f} KB/faction, ready in {faction_result.ready_s:.1f} s"
                )
        if "startup" in plan.parts:
            await run_startup(plan, settings, collected)


async def run_startup(plan: Plan, settings: Settings, collected: Collected) -> None:
    """One uncounted start (it compiles the bytecode into the cache every later start reads), then the
    counted ones; the import times last, with the same cache."""
    factions = range(FIRST_FACTION, FIRST_FACTION + plan.startup_factions)
    with tempfile.TemporaryDirectory(prefix="cat-relay-startup-") as temporary:
        seeded = Path(temporary) / "seeded.db"
        await seed(seeded, factions, plan.events_per_faction)
        cache = bytecode_cache(Path(temporary) / "pycache")
        for repetition in range(plan.startup_runs + 1):
            work_dir = Path(temporary) / f"run{repetition}"
            work_dir.mkdir()
            run = await measure_startup(settings.upstream, seeded, plan.startup_factions, work_dir, cache)
            if repetition == 0:
                collected.first_start = run
            else:
                collected.startup.append(run)
            say(
                f"start-up {repetition}{' (uncounted)' if repetition == 0 else ''}: /ping {run.ping_s * 1000:.0f} ms, "
                f"first log line {run.imported_s * 1000:.0f} ms, all live {run.all_live_s:.2f} s"
            )
        collected.imports = await trio.to_thread.run_sync(import_times, cache)


async def main(plan: Plan, collected: Collected) -> bool:
    """Whether the plan ran to its end (a signal stops it, after every child process has been stopped)."""
    finished = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            await run_plan(plan, collected)
            finished = True
            nursery.cancel_scope.cancel()
    return finished


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        say(f"{signal.Signals(signum).name}: stopping the relay and the upstream")
        scope.cancel()
        return


def plan_lines(plan: Plan) -> list[str]:
    lines = [
        "Every measurement gets a fresh relay process (same build, new database: CPython keeps memory once "
        "grown) and the same fake upstream, quiet: no changes at all, so held clients stay held until their "
        "`wait` runs out. Relay memory from /proc: RSS is every resident page of the process, all threads "
        "together (the interpreter, shared libraries, SQLite's page caches, worker threads' stacks); PSS shares "
        "out the pages shared with other processes; USS is the private pages alone (`smaps_rollup`).",
    ]
    if "clients" in plan.parts:
        lines.append(
            f"Clients: {plan.client_factions} factions subscribed, live and reconciled before the clients come, "
            f"the clients spread evenly over them, each from its own loopback address (127.1.x.y), at most "
            f"{plan.connect_concurrency} connects in flight. long-poll: `GET /events?faction_id&since&wait="
            f"{plan.wait_s:g}`, re-requested at once with the answer's cursor on its keep-alive connection; "
            "SSE: `GET /events/stream`. Relay config: `limits.max_held_requests` = clients + 1000, "
            f"`upstream.joins_per_second` = {plan.joins_per_second:g}."
        )
    if "factions" in plan.parts:
        lines.append(
            f"Factions: `POST /subscribe` for each, {SUBSCRIBES_IN_FLIGHT} at a time, then `/status` until every upstream socket is "
            f"live and its first reconcile done; `limits.max_factions` = factions, `upstream.joins_per_second` = "
            f"{plan.joins_per_second:g}; no clients, no changes."
        )
    if "startup" in plan.parts:
        lines.append(
            f"Start-up: {plan.startup_factions} factions active in a database seeded through the relay's store "
            f"(`open_store`, `subscribe`, `append_events`), each with {plan.events_per_faction} war-call INSERTs "
            "of ~400 bytes (so as many stored rows), copied afresh for each run; the relay's default config."
        )
    if plan.tracemalloc:
        lines.append(
            "**tracemalloc on in the relay**: its memory figures include tracemalloc's own bookkeeping and are "
            "not the goal's figures; see *Where the memory goes* below."
        )
    lines.append(
        "CPU pinning: the relay alone on CPU 0, this load generator and the fake upstream on CPU 1."
        if plan.pin
        else "No CPU pinning."
    )
    return lines


def parse_args(argv: Sequence[str]) -> tuple[Plan, Path | None]:
    parser = argparse.ArgumentParser(prog="bench.footprint", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 200/500 clients, 20/50 factions, 2 start-ups of 30"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument(
        "--clients", default=None, help="comma-separated client counts (default 1000,5000,10000)"
    )
    parser.add_argument(
        "--client-factions", type=int, default=100, help="live factions the clients spread over"
    )
    parser.add_argument(
        "--factions", default=None, help="comma-separated faction counts (default 100,500,1000)"
    )
    parser.add_argument(
        "--joins-per-second", type=float, default=500.0, help="upstream.joins_per_second in the memory parts"
    )
    parser.add_argument(
        "--startup-factions", type=int, default=None, help="active factions stored (default 150)"
    )
    parser.add_argument("--startup-runs", type=int, default=None, help="start-up repetitions (default 5)")
    parser.add_argument(
        "--events-per-faction",
        type=int,
        default=default_retention(),
        help="events stored per faction for the start-up (default: retention.events_per_faction)",
    )
    parser.add_argument(
        "--hold-s",
        type=float,
        default=None,
        help="memory sampled this long once settled (default 3, quick 2)",
    )
    parser.add_argument("--wait-s", type=float, default=25.0, help="long-poll wait=")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="don't pin the relay to its own CPU"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the relay's allocations in the memory parts and list what grew (its figures are inflated; "
        "writes nothing unless --output)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default bench/RESULTS-footprint.md (none with --quick or --tracemalloc)",
    )
    args = parser.parse_args(argv)
    parts = [part for part in args.parts.split(",") if part]
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}")
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    clients = args.clients or ("200,500" if args.quick else "1000,5000,10000")
    factions = args.factions or ("20,50" if args.quick else "100,500,1000")
    plan = Plan(
        parts=parts,
        kinds=kinds,
        clients=[int(n) for n in clients.split(",")],
        client_factions=args.client_factions,
        factions=[int(n) for n in factions.split(",")],
        joins_per_second=args.joins_per_second,
        startup_factions=args.startup_factions or (30 if args.quick else 150),
        startup_runs=args.startup_runs or (2 if args.quick else 5),
        events_per_faction=args.events_per_faction,
        hold_s=args.hold_s if args.hold_s is not None else (2.0 if args.quick else 3.0),
        wait_s=args.wait_s,
        connect_concurrency=args.connect_concurrency,
        pin=args.pin,
        tracemalloc=args.tracemalloc,
    )
    default = None if args.quick or args.tracemalloc else Path(__file__).with_name("RESULTS-footprint.md")
    output = args.output or default
    return plan, output


def run(argv: Sequence[str] | None = None) -> int:
    plan, output = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.orig_argv[1:]])
    limit = raise_open_files_limit()
    if limit < plan.files_needed:
        print(f"bench: RLIMIT_NOFILE hard limit {limit} < {plan.files_needed} needed", file=sys.stderr)
        return 2
    machine = machine_lines()
    collected = Collected()
    if not trio.run(main, plan, collected):
        return 130
    results = Results(
        collected.clients,
        collected.factions,
        collected.startup,
        collected.first_start,
        plan.startup_factions,
        plan.events_per_faction,
        default_upstream().joins_per_second,
        collected.imports,
    )
    text = render(results, plan_lines(plan), machine, command)
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
