"""Turning the footprint measurements into Markdown: per-client and per-faction memory, start-up times."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.memory import ClientFootprint, FactionFootprint, Memory, Settled
from bench.startup import StartupRun, spread

KB, MB = 1024, 1024 * 1024
CLIENT_GOAL_KB = 25.0
FACTION_GOAL_KB = 100.0
PING_GOAL_S = 1.0


@dataclass(frozen=True)
class Results:
    clients: Sequence[ClientFootprint]
    factions: Sequence[FactionFootprint]
    startup: Sequence[StartupRun]
    first_start: StartupRun | None  # uncounted: it compiled the bytecode the others read
    startup_factions: int
    events_per_faction: int
    default_joins_per_second: float
    imports: dict[str, list[float]] | None  # bare, cached, as is (see bench.startup.import_times)


def grown(before: Memory, after: Memory, attribute: str, per: int) -> float:
    difference: int = getattr(after, attribute) - getattr(before, attribute)
    return difference / per / KB


def verdict(value: float, goal: float) -> str:
    return "pass" if value <= goal else f"FAIL ({value / goal:.2f}x)"


def mb(settled: Settled) -> str:
    return f"{settled.memory.rss / MB:.1f}" + ("" if settled.settled else " (still growing)")


def marginal(previous: tuple[int, Settled, Settled] | None, n: int, before: Settled, after: Settled) -> str:
    """RSS growth per unit between this count and the previous one (two relays, each its own baseline)."""
    if previous is None or previous[0] == n:  # a repeated count says nothing about the slope
        return "-"
    n0, before0, after0 = previous
    delta = (after.memory.rss - before.memory.rss) - (after0.memory.rss - before0.memory.rss)
    return f"{delta / (n - n0) / KB:.1f}"


CLIENT_HEADER = (
    "| kind | clients | held | RSS before MB | RSS held MB | RSS KB/client | PSS KB/client | USS KB/client "
    "| marginal RSS KB/client | threads | ramp-up s | client errors | ≤ 25 KB/client |"
)


def client_rows(results: Sequence[ClientFootprint]) -> list[str]:
    rows = []
    previous: dict[str, tuple[int, Settled, Settled]] = {}
    for result in results:
        before, held = result.before.memory, result.held.memory
        per_client = grown(before, held, "rss", result.clients)
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(result.errors.items())) or "0"
        if result.gave_up:
            errors += f", gave up {result.gave_up}"
        cells = [
            result.kind,
            f"{result.clients:,}",
            f"{result.held_sockets:,}",
            mb(result.before),
            mb(result.held),
            f"{per_client:.1f}",
            f"{grown(before, held, 'pss', result.clients):.1f}",
            f"{grown(before, held, 'uss', result.clients):.1f}",
            marginal(previous.get(result.kind), result.clients, result.before, result.held),
            f"{before.threads} → {held.threads}",
            f"{result.ramp_s:.1f}",
            errors,
            verdict(per_client, CLIENT_GOAL_KB),
        ]
        previous[result.kind] = (result.clients, result.before, result.held)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


FACTION_HEADER = (
    "| factions | RSS before MB | RSS live MB | RSS KB/faction | PSS KB/faction | USS KB/faction "
    "| marginal RSS KB/faction | threads | subscribed → all live and reconciled s | ≤ 100 KB/faction |"
)


def faction_rows(results: Sequence[FactionFootprint]) -> list[str]:
    rows = []
    previous: tuple[int, Settled, Settled] | None = None
    for result in results:
        before, live = result.before.memory, result.live.memory
        per_faction = grown(before, live, "rss", result.factions)
        cells = [
            f"{result.factions:,}",
            mb(result.before),
            mb(result.live),
            f"{per_faction:.1f}",
            f"{grown(before, live, 'pss', result.factions):.1f}",
            f"{grown(before, live, 'uss', result.factions):.1f}",
            marginal(previous, result.factions, result.before, result.live),
            f"{before.threads} → {live.threads}",
            f"{result.ready_s:.1f}",
            verdict(per_faction, FACTION_GOAL_KB),
        ]
        previous = (result.factions, result.before, result.live)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


STARTUP_HEADER = (
    "| factions stored | events each | runs | spawn → /ping 200 ms | spawn → first log line ms "
    "| spawn → 'listening' logged ms "
    "| spawn → first socket live s | spawn → all live s | RSS all live MB | resync events by then "
    "| /ping ≤ 1 s (median) |"
)


def startup_row(results: Results, runs: Sequence[StartupRun], label: str, *, judged: bool = True) -> str:
    median = statistics.median(run.ping_s for run in runs)
    slowest = max(run.ping_s for run in runs)
    cells = [
        str(results.startup_factions),
        str(results.events_per_faction),
        label,
        spread([run.ping_s for run in runs], 1000),
        spread([run.imported_s for run in runs], 1000),
        spread([run.listening_s for run in runs], 1000),
        spread([run.first_live_s for run in runs], 1, 2),
        spread([run.all_live_s for run in runs], 1, 2),
        spread([run.rss_bytes for run in runs], 1 / MB, 1),
        spread([run.resync_events for run in runs]),
        verdict(median, PING_GOAL_S) + f" (slowest {slowest * 1000:.0f} ms)" if judged else "not judged",
    ]
    return "| " + " | ".join(cells) + " |"


def allocation_sections(results: Results) -> list[str]:
    traced = [(f"{r.kind}, {r.clients:,} clients", r.allocations) for r in results.clients]
    traced += [(f"{r.factions:,} idle factions", r.allocations) for r in results.factions]
    lines: list[str] = []
    for title, allocations in traced:
        if allocations is not None:
            lines += ["", *allocations.render(title)]
    if not lines:
        return []
    return [
        "",
        "## Where the memory goes (tracemalloc)",
        "",
        "The relay traced its Python allocations (16 frames each) and dumped a snapshot before the clients "
        "(factions) came and one once they were settled; these are the differences, per client (faction). "
        "Memory that SQLite, OpenSSL or the kernel allocate is not traced.",
        *lines,
    ]


def render(results: Results, description: Sequence[str], machine: Sequence[str], command: str) -> str:
    lines = ["# Footprint: relay memory per held client and per idle faction; start-up time", ""]
    lines += [f"- {line}" for line in machine]
    lines += [f"- Command: `{command}`"]
    lines += [f"- {line}" for line in description]
    if results.clients:
        lines += [
            "",
            "## Memory per held client (goal ≤ 25 KB)",
            "",
            "KB/client = (the relay's memory with every client held and settled - the same relay's before the "
            "clients came) / clients. Each memory figure is the largest of the samples taken every 0.5 s "
            "once the RSS grows by less than 512 KB a second; *held* is the client connections the relay had "
            "open then; *marginal* is the growth per client between this count and the one before it, "
            "each measured against its own relay's baseline.",
            "",
            CLIENT_HEADER,
            "|" + "---|" * (CLIENT_HEADER.count("|") - 1),
            *client_rows(results.clients),
        ]
    if results.factions:
        lines += [
            "",
            "## Memory per idle faction (goal ≤ 100 KB)",
            "",
            "KB/faction = (the relay's memory with every faction subscribed, its upstream socket live and its "
            "first reconcile done, settled - the same relay's before the first `/subscribe`, after a `/ping`, a "
            "`/status` and a `/health`) / factions. The first faction also starts the relay-wide DELETE "
            "socket and the REST client's connection pool, a one-off cost the *marginal* column leaves out.",
            "",
            FACTION_HEADER,
            "|" + "---|" * (FACTION_HEADER.count("|") - 1),
            *faction_rows(results.factions),
        ]
    if results.startup:
        floor_s = 2 * results.startup_factions / results.default_joins_per_second
        lines += [
            "",
            "## Start-up with active factions stored (goal: `/ping` within 1 s)",
            "",
            "Median (min-max) over the runs. Times are from just before the process is spawned; `/ping` is "
            "knocked on with a fresh connection every 10 ms; the *first log line* is the relay's own stamp "
            "once its imports and config are done. Every run reads the relay's bytecode from a cache, as an "
            "installed relay does; the first start, not counted, compiled it. The default `upstream.joins_per_second` "
            f"({results.default_joins_per_second:g}) paces the joins, two channels per faction, so the last "
            f"socket cannot be live before ~{floor_s:g} s. The fake upstream's REST tables are empty, so each "
            "reconcile turns the faction's stored rows into DELETE resync events (the *resync events* column).",
            "",
            STARTUP_HEADER,
            "|" + "---|" * (STARTUP_HEADER.count("|") - 1),
            startup_row(results, results.startup, f"{len(results.startup)}"),
        ]
        if results.first_start is not None:
            lines.append(
                startup_row(results, [results.first_start], "first, uncounted (compiling)", judged=False)
            )
    lines += allocation_sections(results)
    if results.imports is not None:
        imports = results.imports
        as_is = os.environ.get("PYTHONDONTWRITEBYTECODE") or "unset"
        lines += [
            "",
            f"For context (ms, median (min-max) of {len(imports['bare'])}): a bare interpreter, "
            f"`python -c pass`, starts and exits in {spread(imports['bare'], 1000)}; `import relay.cli`, timed "
            f"inside the interpreter, takes {spread(imports['cached'], 1000)} with the bytecode cached and "
            f"{spread(imports['as is'], 1000)} as this environment runs it (PYTHONDONTWRITEBYTECODE {as_is}, "
            "which leaves an editable install's own modules to be compiled at every start).",
        ]
    return "\n".join(lines) + "\n"
