"""Memory budget: the relay's RSS under the worst legitimate load at the default config (issue 16, point 1).

One `relay serve` with every default (bar its port and database), against the fake Supabase in this
process, driven by `relay.testing.worst_case` (the load tests/test_memory_budget.py asserts on):
`limits.max_factions` factions subscribed; each publishing `publish.max_body_bytes` bodies of
`faction_members_update` until past `retention.bytes_per_faction`; upstream rows at the size
Supabase allows (just under 1 MiB) as live changes, then every upstream socket dropped so that each
faction reconnects and reads its rows back through REST; then, all at once, a member per faction
polling from a cursor older than every publish and readers of `GET /state`. Each faction and each
member speaks from a loopback address of its own, so no limit is raised. The relay's RSS
(`/proc/PID/status` VmRSS) is sampled every 0.1 s; each phase's peak is charged to it.
Writes `bench/RESULTS-budget.md` (none with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from bench.memory import Memory, memory
from bench.processes import Relay, open_relay
from bench.report import machine_lines
from bench.upstream import ANON_KEY
from relay.config import LimitsConfig, PublishConfig, RetentionConfig
from relay.testing.fake_supabase import FakeSupabase
from relay.testing.rss import Phase, RssSampler
from relay.testing.worst_case import (
    MIB,
    RSS_BUDGET_BYTES,
    Outcome,
    Plan,
    default_plan,
    drive_worst_case,
)

QUICK_FACTIONS = 20


@dataclasses.dataclass(frozen=True)
class Result:
    plan: Plan
    outcome: Outcome
    settled: Memory  # /proc/PID/smaps_rollup once the load and the checks are over
    warnings: list[str]


def progress(phase: Phase) -> None:
    print(
        f"{phase.name}: {phase.seconds:.1f} s, RSS peak {phase.peak_rss / MIB:.0f} MiB, "
        f"end {phase.ended_rss / MIB:.0f} MiB",
        file=sys.stderr,
    )


async def main(plan: Plan) -> Result:
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    with tempfile.TemporaryDirectory(prefix="cat-relay-budget-") as temporary:
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.run)
            async with open_relay(fake.url, Path(temporary), gc_probe=False) as relay:
                result = await measure(relay, fake, plan)
            nursery.cancel_scope.cancel()
    return result


async def measure(relay: Relay, fake: FakeSupabase, plan: Plan) -> Result:
    sampler = RssSampler(relay.pid, on_phase=progress)
    outcome = await drive_worst_case(relay.url, fake, ANON_KEY, plan, sampler)
    return Result(plan, outcome, memory(relay.pid), list(relay.warnings))


def render(result: Result, command: str) -> str:
    plan, outcome = result.plan, result.outcome
    retention, limits, publish = RetentionConfig(), LimitsConfig(), PublishConfig()
    verdict = "pass" if outcome.peak_rss < RSS_BUDGET_BYTES else "FAIL"
    lines = ["# Memory budget: relay RSS under the worst legitimate load at the defaults", ""]
    lines += [f"- {line}" for line in machine_lines()]
    lines += [f"- Command: `{command}`", ""]
    lines += [(__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    lines += [
        f"- Defaults: `limits.max_factions` {limits.max_factions}, `publish.max_body_bytes` "
        f"{publish.max_body_bytes:,}, `retention.events_per_faction` {retention.events_per_faction}, "
        f"`retention.bytes_per_faction` {retention.bytes_per_faction:,}, "
        f"`retention.memory_bytes_per_faction` {retention.memory_bytes_per_faction:,}, "
        f"`retention.memory_bytes` {retention.memory_bytes:,}",
        f"- Load: {plan.factions} factions, each {plan.publishes_per_faction} publishes (and one more after the "
        f"load, which the check reads) of {plan.body_bytes:,} bytes "
        f"({outcome.published_bytes / MIB:,.0f} MiB); {outcome.rows_inserted} upstream rows of "
        f"{plan.row_bytes:,} bytes ({plan.rows_per_faction} per faction); {outcome.polls} polls from before "
        f"the flood and {plan.state_readers} `/state` reads at once ({outcome.served_bytes / MIB:,.0f} MiB "
        f"served; {outcome.dropped} connections closed by the relay unanswered, asked again)",
        f"- Checks: `/ping` answered after the load; factions whose publish after the load was not served: "
        f"{len(outcome.newest_missing)}; relay WARNING/ERROR lines: {len(result.warnings)}",
        "",
        f"## Budget {RSS_BUDGET_BYTES / MIB:.0f} MiB: peak {outcome.peak_rss / MIB:,.0f} MiB, "
        f"settled {outcome.phases[-1].ended_rss / MIB:,.0f} MiB ({verdict})",
        "",
        f"At the end: RSS {result.settled.rss / MIB:,.1f} MiB, PSS {result.settled.pss / MIB:,.1f} MiB, "
        f"USS {result.settled.uss / MIB:,.1f} MiB, threads {result.settled.threads}, after the settled phase "
        "and the checks.",
        "",
        "| phase | s | RSS at start MiB | RSS peak MiB | RSS at end MiB | relay CPU s | load + fake upstream CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {phase.name} | {phase.seconds:.1f} | {phase.started_rss / MIB:,.0f} | {phase.peak_rss / MIB:,.0f} "
        f"| {phase.ended_rss / MIB:,.0f} | {phase.relay_cpu_s:.1f} | {phase.driver_cpu_s:.1f} |"
        for phase in outcome.phases
    ]
    if result.warnings:
        lines += ["", "Relay warnings (first 10):", "", "```", *result.warnings[:10], "```"]
    return "\n".join(lines) + "\n"


def run_cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.budget", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--factions", type=int, help="fewer factions than limits.max_factions; writes nothing"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_FACTIONS} factions; writes nothing")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS-budget.md"))
    args = parser.parse_args(argv)
    plan = default_plan()
    factions = QUICK_FACTIONS if args.quick else args.factions
    if factions:
        plan = dataclasses.replace(plan, factions=factions)
    result = trio.run(main, plan)
    text = render(
        result, " ".join([".venv/bin/python -m bench.budget", *(sys.argv[1:] if argv is None else argv)])
    )
    print(text)
    if not factions:
        args.output.write_text(text)
        print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    run_cli()
