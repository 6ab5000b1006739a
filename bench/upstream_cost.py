"""Upstream cost: what one faction costs Supabase per hour and per day (issue 17, point 3).

The relay runs in this process (`run_relay`, default config bar its port, database and the clock
compression below) against the fake Supabase, one faction per run, so every upstream byte is that
faction's, the project-wide parts included (the deafness probe rounds, the shared DELETE socket):
the worst case, a project with one faction. Measured from the end of the faction's going-live reads (its first reconcile, and the cold start's)
(its start-up read, reported apart) through one faction-hour:

- quiet: no change all hour;
- busy: a war's traffic, calls made and dropped and chat messages, `BUSY_CHANGES_PER_HOUR` in all;
- gap: quiet, but halfway through its socket is cut and a call is made while it is down: the
  reconnect's reconcile heals it;
- periodic (before): quiet, as the relay was before issue 17, with probes off and a full reconcile
  every `reconcile_interval_s` (300 s).

at 100 and at 1,000 rows per table (history in war_calls and faction_messages, `FakeSupabase.seed_history`).

The clock is compressed: every interval the relay keeps (heartbeat 25 s, probe 40 s, probe grace
10 s, reconcile 300 s) is divided by `--compress` (default 100), so a faction-hour takes 36 s;
counts per hour are what the compressed hour made, bytes are real. Egress is the response bytes the
fake's PostgREST sent, head included (Supabase's gateway adds ~0.5 KB of its own headers per
response, not counted here: see the requests column). Writes `bench/RESULTS-upstream-cost.md`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from bench.report import machine_lines
from relay.config import load_config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.supervisor import COLD_START_RECONCILE_S, UpstreamState

ANON_KEY = "anon-key"
FACTION = 46666
HOUR_S = 3600.0
BUSY_CHANGES_PER_HOUR = 600  # 200 calls made and 200 dropped, 200 chat messages: a busy war hour
DEFAULT_OUTPUT = Path("bench/RESULTS-upstream-cost.md")
BUDGET_QUIET_BYTES_PER_DAY = 1_000_000


@dataclass(frozen=True)
class Cost:
    scenario: str
    rows: int
    rest_requests: int
    rest_bytes: int
    connects: int
    joins: int
    heartbeats: int
    full_reads: int  # REST requests of reconciles (whole rows, select=*), one per table per page
    body_bytes: int  # of the REST bytes, the response bodies alone (as the relay counts them)
    startup_requests: int
    startup_bytes: int


class Tally:
    """The fake's counters, and the heartbeats of every socket, closed ones included."""

    def __init__(self, fake: FakeSupabase, relay: RunningRelay) -> None:
        self._fake = fake
        self._relay = relay
        self._heartbeats: dict[int, int] = {}
        self._kept: list[object] = []  # the connections, so their ids stay theirs

    def sample(self) -> None:
        for connection in self._fake.connections:
            if id(connection) not in self._heartbeats:
                self._kept.append(connection)
            self._heartbeats[id(connection)] = connection.heartbeats

    def now(self) -> tuple[int, int, int, int, int, int, int]:
        self.sample()
        fake = self._fake
        stats = self._relay.supervisors.statistics()[FACTION].reconcile
        full = stats.rest_requests if stats is not None else 0  # the reconciles' reads: whole rows
        bodies = stats.rest_bytes if stats is not None else 0
        deafness = self._relay.services.deafness
        bodies += deafness.statistics().probe_bytes if deafness is not None else 0
        return (
            fake.rest_request_count,
            sum(fake.rest_bytes.values()),
            fake.upgrade_attempts,
            fake.joins,
            sum(self._heartbeats.values()),
            full,
            bodies,
        )


def relay_toml(compress: float, periodic: bool) -> str:
    probe = "probe_interval_s = 0\n" if periodic else f"probe_interval_s = {40 / compress}\n"
    return (
        "[upstream]\n"
        f"heartbeat_interval_s = {25 / compress}\n"
        f"reconcile_interval_s = {300 / compress}\n"
        f"{probe}"
        f"probe_grace_s = {10 / compress}\n"
    )


async def measure(scenario: str, rows: int, compress: float) -> Cost:
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    fake.seed_history(FACTION, rows)
    hour_s = HOUR_S / compress
    with tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / "relay.toml"
        config_file.write_text(relay_toml(compress, periodic=scenario == "periodic (before)"))
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.run)
            config = load_config(
                config_file,
                environ={},
                overrides={
                    "RELAY_UPSTREAM_URL": fake.url,
                    "RELAY_UPSTREAM_ANON_KEY": ANON_KEY,
                    "RELAY_SERVER_PORT": "0",
                    "RELAY_STORAGE_PATH": str(Path(scratch) / "relay.db"),
                },
            )
            relay: RunningRelay = await nursery.start(functools.partial(run_relay, config))
            tally = Tally(fake, relay)
            async with httpx.AsyncClient(base_url=relay.url) as http:
                answer = await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
                answer.raise_for_status()
            with trio.fail_after(120):
                # Start-up: the reads of going live, which a join pays once: the faction's first
                # reconcile, the one the shared DELETE socket's going live asks for, and the cold
                # start's, COLD_START_RECONCILE_S (real seconds, not compressed) after going live.
                while not _settled(relay):  # noqa: ASYNC110 - statistics
                    await trio.sleep(0.01)
            start = tally.now()
            async with trio.open_nursery() as load:
                load.start_soon(_sample, tally)
                if scenario == "busy":
                    load.start_soon(_busy, fake, hour_s, rows)
                if scenario == "gap":
                    load.start_soon(_gap, fake, hour_s, rows)
                await trio.sleep(hour_s)
                load.cancel_scope.cancel()
            end = tally.now()
            relay.stop()
            nursery.cancel_scope.cancel()
    requests, sent, connects, joins, heartbeats, full, bodies = (
        b - a for a, b in zip(start, end, strict=True)
    )
    return Cost(scenario, rows, requests, sent, connects, joins, heartbeats, full, bodies, start[0], start[1])


def _shared_connected(relay: RunningRelay) -> bool:
    shared = relay.supervisors.shared_deletes_statistics()
    return shared is not None and shared.state == UpstreamState.CONNECTED


def _settled(relay: RunningRelay) -> bool:
    upstream = relay.supervisors.statistics().get(FACTION)
    if upstream is None or upstream.reconcile is None or upstream.connected_since is None:
        return False
    live_for_s = (relay.services.wall_clock_ms() - upstream.connected_since) / 1000
    return (
        _shared_connected(relay)
        and upstream.reconcile.reconciles >= 1
        and not upstream.reconcile.due
        and live_for_s > COLD_START_RECONCILE_S + 0.5
    )


async def _sample(tally: Tally) -> None:
    while True:
        tally.sample()
        await trio.sleep(0.05)


async def _busy(fake: FakeSupabase, hour_s: float, rows: int) -> None:
    step_s = hour_s / BUSY_CHANGES_PER_HOUR
    key = 90_000_000 + rows
    made: list[int] = []
    for n in range(BUSY_CHANGES_PER_HOUR):
        kind = n % 3
        if kind == 0:
            fake.insert("war_calls", _call(key, n))
            made.append(key)
        elif kind == 1 and made:
            fake.delete("war_calls", made.pop(0))
        else:
            fake.insert(
                "faction_messages",
                {"id": key, "faction_id": FACTION, "sender_id": 1, "sender_name": "ann", "message": f"m{n}"},
            )
        key += 1
        await trio.sleep(step_s)


async def _gap(fake: FakeSupabase, hour_s: float, rows: int) -> None:
    await trio.sleep(hour_s / 2)
    fake.freeze()
    fake.insert("war_calls", _call(95_000_000 + rows, 0), deliver=False)
    fake.drop_connections()


def _call(key: int, n: int) -> dict[str, object]:
    return {
        "id": key,
        "faction_id": FACTION,
        "target_id": 4_000_000 + n,
        "caller_id": 1,
        "caller_name": "ann",
    }


def report(costs: list[Cost], compress: float) -> str:
    lines = [
        "# Upstream cost per faction",
        "",
        "What one faction costs the Supabase project, per faction-hour and per day, from `python -m"
        " bench.upstream_cost` (module docstring: the scenarios and how they are run). One faction per"
        " relay, so the project-wide parts (probe rounds, the shared DELETE socket) are all charged to"
        f" it. Clock compressed {compress:g} times: a faction-hour took {HOUR_S / compress:g} s, every"
        " interval of the relay divided alike; bytes are real response bytes (head and body) of the fake's"
        " PostgREST. Start-up, reported apart, runs from the subscribe until the going-live reads are"
        " done: the faction's first read, and the cold start's check 12 real seconds later, during"
        " which the compressed probe rounds make about 100 requests.",
        "",
        "| scenario | rows per table | REST requests / h | REST bytes / h | REST MB / day | of which bodies,"
        " MB / day | full-read"
        " requests / h | socket connects / h | joins / h | heartbeats / h | start-up (REST requests, bytes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for cost in costs:
        lines.append(
            f"| {cost.scenario} | {cost.rows} | {cost.rest_requests} | {cost.rest_bytes:,} |"
            f" {cost.rest_bytes * 24 / 1e6:.2f} | {cost.body_bytes * 24 / 1e6:.2f} | {cost.full_reads} | {cost.connects} | {cost.joins} |"
            f" {cost.heartbeats} | {cost.startup_requests}, {cost.startup_bytes:,} |"
        )
    quiet = next((c for c in costs if c.scenario == "quiet" and c.rows == 100), None)
    lines += ["", "## Goals", ""]
    if quiet is not None:
        per_day = quiet.rest_bytes * 24
        bodies = quiet.body_bytes * 24
        verdict = "met" if per_day <= BUDGET_QUIET_BYTES_PER_DAY else "NOT met"
        lines.append(
            f"- A quiet faction at 100 rows per table, alone on its project: {per_day / 1e6:.2f} MB of REST"
            f" egress a day counting whole responses (goal ≤ 1 MB): {verdict}; {bodies / 1e6:.2f} MB counting"
            " bodies only, as the issue's 14 MB estimate did. The probe rounds are the project's: with N"
            f" live factions each pays 1/N of them ({per_day / 2e6:.2f} MB a day each with 2 factions,"
            f" {per_day / 150e3:.1f} KB with 150). `upstream.probe_interval_s` trades this against how soon"
            " a deaf channel is found (interval + grace)."
        )
    busy = [c for c in costs if c.scenario == "busy"]
    if busy:
        worst = max(c.full_reads for c in busy)
        lines.append(
            f"- A healthy busy faction made {worst} full-read request(s) in its hour (goal: none while live)."
        )
    gap = [c for c in costs if c.scenario == "gap"]
    if gap:
        tables = 3
        lines.append(
            "- A healed gap: full-read requests in the hour "
            + ", ".join(f"{c.full_reads} at {c.rows} rows" for c in gap)
            + f" (one full read is one request per table, {tables} tables, more when a table is"
            " larger than a page; goal: at most one full read)."
        )
    lines += ["", "## Machine", "", *machine_lines(), ""]
    return "\n".join(lines)


async def main(arguments: argparse.Namespace) -> None:
    costs = []
    for rows in arguments.rows:
        for scenario in ("quiet", "busy", "gap", "periodic (before)"):
            cost = await measure(scenario, rows, arguments.compress)
            print(cost, file=sys.stderr)
            costs.append(cost)
    text = report(costs, arguments.compress)
    print(text)
    if arguments.output is not None:
        arguments.output.write_text(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compress", type=float, default=100.0)
    parser.add_argument("--rows", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--quick", action="store_const", const=None, dest="output", help="write no file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())
