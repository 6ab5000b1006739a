"""Members per core with sub-second delivery: the relay's SSE against the Node relay polled every second.

Issue 6, point 3. In one invocation, each on CPU 0 alone:

1. The Node relay (bench/peers/node-relay, the predecessor's design) answering the short-polling mix
   of bench/shortpoll.py as fast as it can, several wrk runs: its median requests/s is how many
   members it serves when each polls once a second, which is what sub-second delivery costs by polling.
2. The relay holding N SSE streams under the delivery benchmark's load (100 factions, one upstream
   change per faction every 2 s; bench/delivery.py), for each N asked for: the largest N whose p99
   from the upstream frame to the client is within 1 s, with every event delivered, is its capacity.

    .venv/bin/python -m bench.capacity                       # N = 12000,15000,19500; writes bench/RESULTS-capacity.md
    .venv/bin/python -m bench.capacity --clients 5000 --node-runs 1 --duration-s 10 --output -   # smoke
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

if __package__ in (None, ""):  # run as `python bench/capacity.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import delivery, shortpoll
from bench.report import ScenarioResult, machine_lines
from bench.shortpoll_data import request_mix, seed_relay_database, write_paths, write_seed_file
from bench.shortpoll_servers import ensure_node_modules, open_node, pin
from bench.wrk_runs import WrkRun, run_wrk, wrk_command

P99_LIMIT_MS = 1000.0
DELIVERED_AT_LEAST = 0.999  # of the expected events: a capacity that drops events is none
SERVER_CPU, LOAD_CPU = 0, 1
NODE_CONNECTIONS = 50


async def node_capacity(runs: int, duration_s: float, data_dir: Path) -> list[WrkRun]:
    """The Node relay on CPU 0, wrk on CPU 1: one warm-up run, then `runs` timed ones."""
    await ensure_node_modules()
    factions = list(range(delivery.FIRST_FACTION, delivery.FIRST_FACTION + 100))
    seeded = await seed_relay_database(shortpoll.seeding_config(data_dir), factions, 40)
    seed_file, paths_file = data_dir / "seed.json", data_dir / "paths.txt"
    write_seed_file(seeded, seed_file)
    write_paths(request_mix(seeded), paths_file)
    async with open_node(seed_file) as node:
        pin(node.pid, {SERVER_CPU})
        pin(os.getpid(), {LOAD_CPU})
        timed = []
        for repetition in range(runs + 1):
            length = min(duration_s, 5.0) if repetition == 0 else duration_s
            command = wrk_command(
                node.url, paths_file, connections=NODE_CONNECTIONS, duration_s=length, cpu=LOAD_CPU
            )
            run = await run_wrk("node", repetition, command, length, node.pid, {}, SERVER_CPU)
            print(f"node run {repetition}: {run.requests / run.duration_s:,.0f} req/s", file=sys.stderr)
            if repetition:
                timed.append(run)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return timed


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def holds(result: ScenarioResult) -> bool:
    p99 = result.percentile_ms(0.99)
    return (
        p99 is not None
        and p99 <= P99_LIMIT_MS
        and result.expected > 0
        and result.delivered >= DELIVERED_AT_LEAST * result.expected
    )


def render(command: str, node_runs: Sequence[WrkRun], results: Sequence[ScenarioResult]) -> str:
    rates = sorted(run.requests / run.duration_s for run in node_runs)
    node_members = statistics.median(rates)
    node_per_cpu_s = statistics.median(run.requests / run.server_cpu_s for run in node_runs)
    held = [result for result in results if holds(result)]
    capacity = max((result.clients for result in held), default=0)
    lines = [
        "# Capacity: members per core with sub-second delivery",
        "",
        *[f"- {line}" for line in machine_lines()],
        f"- Command: `{command}`",
        "- Node relay: bench/peers/node-relay (Express, the predecessor's in-memory list filtered by `since`), "
        "answering bench/shortpoll.py's mix (100 factions, 90 % empty polls, 10 % with 1-5 events of ~400 bytes) "
        f"from wrk with {NODE_CONNECTIONS} connections, as fast as it can, alone on CPU 0: a member polling every "
        "second costs it one request, so its requests/s is the members it serves at 1-s polling.",
        "- Relay: bench/delivery.py's SSE scenario (100 factions, one upstream INSERT per faction every 2 s, the "
        "clients spread evenly, each from its own loopback address), a fresh relay per N, alone on CPU 0. It "
        f"holds N when the window's p99 is ≤ {P99_LIMIT_MS:.0f} ms and ≥ {DELIVERED_AT_LEAST:.1%} of the "
        "expected events arrived.",
        "",
        "| server | members | how measured | p50 ms | p99 ms | server CPU % |",
        "|---|---|---|---|---|---|",
    ]
    for run in node_runs:
        rate = run.requests / run.duration_s
        cpu = 100 * run.server_cpu_s / run.duration_s
        lines.append(
            f"| node | {rate:,.0f} | wrk run {run.repetition}, {run.duration_s:.0f} s | "
            f"{run.p50_ms:.1f} | {run.p99_ms:.1f} | {cpu:.0f} |"
        )
    for result in results:
        p50, p99 = result.percentile_ms(0.5), result.percentile_ms(0.99)
        verdict = "holds" if holds(result) else "does not hold"
        share = result.delivered / result.expected if result.expected else 0.0
        lines.append(
            f"| relay SSE | {result.clients:,} | {verdict}: {share:.1%} delivered | "
            f"{p50 or 0:.1f} | {p99 or 0:.1f} | {100 * result.measurement.relay_cpu_s / result.measurement.elapsed_s:.0f} |"
        )
    ratio = capacity / node_members if node_members else 0.0
    lines += [
        "",
        f"Node relay, 1-s polling: **{node_members:,.0f} members** on one core (median of {len(rates)} runs, "
        f"{rates[0]:,.0f}-{rates[-1]:,.0f}; {node_per_cpu_s:,.0f} requests per CPU-second).",
        "",
        f"Relay, SSE: **{capacity:,} members** held at p99 ≤ 1 s (the largest N tried that held"
        + (
            "; every N tried held, so the relay's capacity is at least this: the load generator opens one "
            f"socket per client and its descriptor limit (RLIMIT_NOFILE {descriptor_limit():,}) bounds N)."
            if held and capacity == max(result.clients for result in results)
            else ")."
        ),
        "",
        f"Relay ÷ Node: **{ratio:.2f}x** members per core (goal, issue 6 point 3: ≥ 3x: "
        f"{'met' if ratio >= 3 else f'not met, short by {3 - ratio:.2f}x'}).",
        "",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace, command: str) -> str:
    with tempfile.TemporaryDirectory(prefix="cat-relay-capacity-") as data_dir:
        node_runs = await node_capacity(args.node_runs, args.duration_s, Path(data_dir))
    plan = delivery.Plan(
        kinds=["sse"],
        clients=[int(n) for n in args.clients.split(",")],
        factions=100,
        interval_s=2.0,
        warmup_s=5.0,
        duration_s=args.duration_s,
        grace_s=5.0,
        wait_s=25.0,
        connect_concurrency=64,
        pin=True,
        gc_probe=True,
        relay_setup=None,
    )
    results = await delivery.run_plan(plan, lambda result: print(result.one_line(), file=sys.stderr))
    return render(command, node_runs, [result for result in results if result.clients])


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.capacity", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--clients", default="12000,15000,19500", help="SSE client counts to try")
    parser.add_argument("--node-runs", type=int, default=5)
    parser.add_argument("--duration-s", type=float, default=20.0, help="each wrk run and each SSE window")
    parser.add_argument(
        "--output", default=str(Path(__file__).with_name("RESULTS-capacity.md")), help="- prints only"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    needed = max(int(n) for n in args.clients.split(",")) + 300
    if delivery.raise_open_files_limit() < needed:
        print(f"bench: RLIMIT_NOFILE hard limit below the {needed} descriptors needed", file=sys.stderr)
        return 2
    command = shlex.join([os.path.relpath(sys.executable), *sys.orig_argv[1:]])
    text = trio.run(main, args, command)
    print(text)
    if args.output != "-":
        Path(args.output).write_text(text)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
