"""Short-polling benchmark: the relay's `GET /events` against the bare hypercorn floor and a Node/Express
relay (the predecessor's design), side by side in one run, interleaved, with wrk.

Today's userscript polls; most polls find nothing new. The mix (`bench/shortpoll_data.py`): 100
factions with 40 stored war calls of ~400 bytes each; 90 % empty polls, 10 % returning 1-5 events,
spread evenly over the factions, shuffled once, the same list for every server. The relay holds the
data as in production (subscribed, in its database, upstream sockets live to a quiet fake Supabase
whose REST tables hold the same rows); the Node relay loads the relay's events byte for byte.

Each server in turn alone on CPU 0, wrk on CPU 1 (`taskset`), one warm-up run each, then floor,
relay, node, floor, relay, node... for --repetitions. The three servers are started once and kept
running, so every repetition measures warm servers with their connections to upstream settled.

    .venv/bin/python -m bench.shortpoll                  # 7 repetitions of 10 s each; writes bench/RESULTS-shortpoll.md
    .venv/bin/python -m bench.shortpoll --quick          # a smoke run: 1 repetition of 3 s; prints, writes nothing
    .venv/bin/python -m bench.shortpoll --repetitions 3 --duration-s 5 --connections 100
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

if __package__ in (None, ""):  # run as `python bench/shortpoll.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processes import RELAY_TOML, Relay, open_relay, relay_environ
from bench.pyspy import record, summarize
from bench.report import machine_lines
from bench.seeded_upstream import open_seeded_upstream
from bench.shortpoll_data import (
    Poll,
    check_answer,
    mean_event_bytes,
    request_mix,
    seed_relay_database,
    write_paths,
    write_seed_file,
)
from bench.shortpoll_report import Outcome, Plan, Profiled, one_line, render
from bench.shortpoll_servers import (
    Server,
    ensure_node_modules,
    get,
    open_floor,
    open_node,
    pin,
    reconcile_differences,
    stored_counts,
    wait_until_reconciled,
)
from bench.wrk_runs import WrkFailed, WrkRun, run_wrk, wrk_command
from relay.config import Config, load_config

FIRST_FACTION = 46001
# wrk comes from one address: the per-address rate limit (20/s by default) would answer 429s.
RELAY_EXTRA_CONFIG = "\n[limits]\nclient_rate = 0\n"
CHECKED_POLLS = 600  # the first polls of the list, checked on every server before timing (~60 with events)
PROFILE_LEAD_S = 1.0  # py-spy attaches before wrk starts
PROFILED_RUN = -1  # the repetition number of the profiled run, which is not counted
SETTLE_S = 2.0  # after the relay is reconciled: its last REST reads and commits land before timing


def seeding_config(data_dir: Path) -> Config:
    """The relay's own config, as `open_relay` will write it, to seed its database with."""
    toml = data_dir / "seed-relay.toml"
    toml.write_text(RELAY_TOML + RELAY_EXTRA_CONFIG)
    environ = relay_environ("ws://127.0.0.1:9/realtime/v1/websocket", data_dir, None, None)
    return load_config(toml, environ=environ)


def cpus(plan: Plan) -> tuple[int | None, int | None]:
    """(servers' CPU, wrk's CPU), or neither without pinning."""
    available = sorted(os.sched_getaffinity(0))
    if not plan.pin:
        return None, None
    if len(available) < 2:
        raise RuntimeError("pinning needs two CPUs: run with --no-pin on this machine")
    return available[0], available[1]


async def check_servers(client: httpx.AsyncClient, servers: Sequence[Server], polls: Sequence[Poll]) -> None:
    """Every server returns the relay's events, byte for byte, for the first CHECKED_POLLS polls."""
    for server in servers:
        for poll in polls[:CHECKED_POLLS]:
            status, body = await get(client, server.url + poll.path)
            problem = check_answer(poll, status, body)
            if problem is not None:
                raise RuntimeError(f"{server.name} answers differently: {problem}")


@dataclass(frozen=True)
class Bench:
    """The running servers and where things run: each measured server alone on `server_cpu`."""

    plan: Plan
    servers: Sequence[Server]
    paths_file: Path
    server_cpu: int | None
    wrk_cpu: int | None

    async def measure(self, server: Server, repetition: int, duration_s: float) -> WrkRun:
        """One wrk run against `server`, alone on its CPU; the other servers idle on wrk's."""
        others = [other for other in self.servers if other is not server]
        if self.server_cpu is not None and self.wrk_cpu is not None:
            pin(server.pid, {self.server_cpu})
            for other in others:
                pin(other.pid, {self.wrk_cpu})
        command = wrk_command(
            server.url,
            self.paths_file,
            connections=self.plan.connections,
            duration_s=duration_s,
            cpu=self.wrk_cpu,
        )
        idle = {other.name: other.pid for other in others}
        run = await run_wrk(server.name, repetition, command, duration_s, server.pid, idle, self.server_cpu)
        print(one_line(run), file=sys.stderr, flush=True)
        return run

    async def timed_runs(self) -> list[WrkRun]:
        """A warm-up run per server (not kept), then floor, relay, node, floor, relay, node..."""
        for server in self.servers:
            await self.measure(server, 0, self.plan.warmup_s)
        return [
            await self.measure(server, repetition, self.plan.duration_s)
            for repetition in range(1, self.plan.repetitions + 1)
            for server in self.servers
        ]

    async def profile(self, server: Server, raw: Path) -> Profiled:
        """py-spy on `server` (from wrk's CPU) during one more run, not counted with the others."""
        stacks: list[str] = []

        async def sample() -> None:
            stacks.append(await record(server.pid, self.plan.duration_s + PROFILE_LEAD_S, raw))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            await trio.sleep(PROFILE_LEAD_S)
            run = await self.measure(server, PROFILED_RUN, self.plan.duration_s)
        return Profiled(server.name, run, summarize(stacks[0]))


async def run_plan(plan: Plan, data_dir: Path) -> Outcome:
    factions = list(range(FIRST_FACTION, FIRST_FACTION + plan.factions))
    server_cpu, wrk_cpu = cpus(plan)
    await ensure_node_modules()
    seeded = await seed_relay_database(seeding_config(data_dir), factions, plan.events_per_faction)
    seed_file, paths_file = data_dir / "seed.json", data_dir / "paths.txt"
    write_seed_file(seeded, seed_file)
    polls = request_mix(seeded)
    write_paths(polls, paths_file)
    checks: list[str] = []
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(open_seeded_upstream(seed_file))
        relay: Relay = await stack.enter_async_context(
            open_relay(
                upstream.url,
                data_dir,
                gc_probe=True,
                # RELAY_TOML ends inside its [server] table.
                extra_config=("" if plan.hot_path else "hot_path = false\n") + RELAY_EXTRA_CONFIG,
            )
        )
        floor = await stack.enter_async_context(open_floor())
        node = await stack.enter_async_context(open_node(seed_file))
        if wrk_cpu is not None:
            pin(upstream.pid, {wrk_cpu})
            pin(os.getpid(), {wrk_cpu})
        client = await stack.enter_async_context(httpx.AsyncClient())
        await wait_until_reconciled(client, relay.url, factions)
        await trio.sleep(SETTLE_S)
        before = await stored_counts(client, relay.url)
        servers = [floor, Server("relay", relay.pid, relay.url), node]
        await check_servers(client, servers[1:], polls)
        checks.append(
            f"Before timing, the first {CHECKED_POLLS} polls of the list (of them "
            f"{sum(1 for poll in polls[:CHECKED_POLLS] if poll.expected)} with events) answered by the relay and by "
            "the Node relay: the same events, byte for byte, as the relay stored them; the same timestamp when "
            "events came (an empty answer's timestamp and `next_poll_ms` may differ)."
        )
        bench = Bench(plan, servers, paths_file, server_cpu, wrk_cpu)
        runs = await bench.timed_runs()
        checks.append(gc_check(relay, [run for run in runs if run.server == "relay"]))
        profiled = []
        if plan.profile:
            raw = plan.profile_raw or data_dir / "relay-pyspy.txt"
            profiled.append(await bench.profile(servers[1], raw))
            profiled.append(await bench.profile(servers[0], raw.with_name(f"floor-{raw.name}")))
        after = await stored_counts(client, relay.url)
        await check_servers(client, servers[1:2], polls)
        checks.extend(frozen_checks(before, after, factions, plan.events_per_faction))
        differences = await reconcile_differences(client, relay.url)
        if differences:
            raise RuntimeError(f"the relay's reconciles changed the data set: {differences}")
        stats = await upstream.ask("stats")
        checks.append(
            f"The relay's upstream sockets stayed live to the quiet fake Supabase ({stats['connections']} sockets, "
            f"{stats['rest_requests']} REST reads by its reconciles, none of which stored a difference)."
        )
        if relay.warnings:
            checks.append("Relay warnings: " + "; ".join(relay.warnings[:10]))
    return Outcome(runs, checks, mean_event_bytes(seeded), len(polls), profiled)


def gc_check(relay: Relay, runs: Sequence[WrkRun]) -> str:
    """The relay's garbage collections during its timed runs, as its GC probe logged them."""
    pauses = [pause for run in runs for pause in relay.gc_pauses(run.started_ns, run.ended_ns)]
    elapsed_s = sum(run.elapsed_s for run in runs)
    full = [pause for pause in pauses if pause.generation == 2]
    longest_ms = max((pause.took_ns for pause in pauses), default=0) / 1e6
    total_s = sum(pause.took_ns for pause in pauses) / 1e9
    return (
        f"The relay's garbage collections during its {len(runs)} timed runs ({elapsed_s:.0f} s), logged by the "
        f"`sitecustomize` GC probe of bench/processes.py (full collections and any over 5 ms): {len(full)} full, "
        f"{len(pauses)} logged, longest {longest_ms:.1f} ms, together {total_s:.2f} s "
        f"({100 * total_s / elapsed_s if elapsed_s else 0:.1f} % of the time)."
    )


def frozen_checks(
    before: dict[int, int], after: dict[int, int], factions: Sequence[int], per_faction: int
) -> list[str]:
    """The data set did not move during the timed runs (else the servers would not be comparable)."""
    wanted = {faction_id: per_faction for faction_id in factions}
    seen_before = {faction_id: before.get(faction_id, 0) for faction_id in factions}
    seen_after = {faction_id: after.get(faction_id, 0) for faction_id in factions}
    if seen_before != wanted or seen_after != wanted:
        moved = {
            faction_id: (seen_before[faction_id], seen_after[faction_id])
            for faction_id in factions
            if (seen_before[faction_id], seen_after[faction_id]) != (per_faction, per_faction)
        }
        raise RuntimeError(f"the data set moved: faction: (events before, after) {moved}")
    return [
        f"Data set frozen: the relay's /status counted {per_faction} events stored for each of the "
        f"{len(factions)} factions before and after the timed runs, and the relay's answers to the checked "
        "polls were the same after them."
    ]


async def main(plan: Plan) -> Outcome | None:
    """The outcome, or None when a signal stopped the run (after every child was stopped)."""
    outcome: Outcome | None = None
    with (
        tempfile.TemporaryDirectory(prefix="cat-relay-shortpoll-") as data_dir,
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            outcome = await run_plan(plan, Path(data_dir))
            nursery.cancel_scope.cancel()
    return outcome


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        print(f"bench: {signal.Signals(signum).name}: stopping every server", file=sys.stderr)
        scope.cancel()
        return


def parse_args(argv: Sequence[str]) -> tuple[Plan, Path | None]:
    parser = argparse.ArgumentParser(prog="bench.shortpoll", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 3 s runs; prints only")
    parser.add_argument("--repetitions", type=int, default=None, help="default 7 (1 with --quick)")
    parser.add_argument("--duration-s", type=float, default=None, help="per run (default 10, 3 with --quick)")
    parser.add_argument("--warmup-s", type=float, default=None, help="per server (default 5, 2 with --quick)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--factions", type=int, default=100)
    parser.add_argument("--events-per-faction", type=int, default=40)
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="don't pin servers and wrk to CPUs"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the py-spy profile of the relay (one more relay run, after the counted ones)",
    )
    parser.add_argument(
        "--profile-raw", type=Path, default=None, help="keep py-spy's raw stacks in this file"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="default bench/RESULTS-shortpoll.md (none with --quick)"
    )
    parser.add_argument(
        "--no-hot-path",
        dest="hot_path",
        action="store_false",
        help="run the relay with server.hot_path = false: every poll through hypercorn (design B)",
    )
    args = parser.parse_args(argv)
    plan = Plan(
        factions=args.factions,
        events_per_faction=args.events_per_faction,
        connections=args.connections,
        duration_s=args.duration_s if args.duration_s is not None else (3.0 if args.quick else 10.0),
        warmup_s=args.warmup_s if args.warmup_s is not None else (2.0 if args.quick else 5.0),
        repetitions=args.repetitions if args.repetitions is not None else (1 if args.quick else 7),
        pin=args.pin,
        profile=args.profile,
        profile_raw=args.profile_raw,
        hot_path=args.hot_path,
    )
    if plan.repetitions < 1 or plan.duration_s < 1 or plan.connections < 1:
        parser.error("--repetitions, --duration-s and --connections must be at least 1")
    output = args.output or (None if args.quick else Path(__file__).with_name("RESULTS-shortpoll.md"))
    return plan, output


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def run(argv: Sequence[str] | None = None) -> int:
    plan, output = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.orig_argv[1:]])
    failures: list[BaseException] = []
    outcome = None
    try:
        outcome = trio.run(main, plan)
    except* (WrkFailed, RuntimeError, trio.TooSlowError) as group:  # nurseries wrap what they pass on
        failures.extend(leaves(group))
    if failures:
        for failure in failures:
            print(
                f"bench: FAILED: {failure!r}"
                if isinstance(failure, trio.TooSlowError)
                else f"bench: FAILED: {failure}",
                file=sys.stderr,
            )
        return 1
    if outcome is None:
        return 130
    text = render(plan, outcome, machine=machine_lines(), command=command)
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
