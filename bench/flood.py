"""Flood benchmark: one faction's upstream sending N changes/s, and whether the relay keeps its socket.

Issue 16 point 2 asks that "the connection stays up at 5,000 changes/s for one faction, measured".
Two processes, each pinned to a CPU of its own where there are two:

- the fake Supabase (`python -m bench.flood --serve-upstream`), which writes `rate` changes/s to one
  faction's `war_calls` (upserts cycling over `--keys` rows, so the first pass inserts and the rest
  update; every change differs from the row it replaces) and keeps its table true to what it sent;
- the relay, in this process (`relay.service.run_relay`, the same composition as `relay serve`), so
  that its supervisor's statistics are read directly: reconnects, changes dropped, the latest
  heartbeat round trip (sampled every 100 ms), the events stored live and by the reconcile.

Per rate, a fresh relay and database: subscribe the faction, wait for its first reconcile, flood for
`--duration-s`, wait until every change sent is stored or counted as dropped, then (if any were
dropped) for the reconcile the flood requests; last, the faction's stored rows are compared with the
fake's. Heartbeats every `--heartbeat-s` (25 s, the relay's default): the round trip shows how far
the reader lags behind the socket, and a reply later than the interval ends it (a reconnect).
Each rate runs with the relay's backlog (10,000 changes); then 5,000/s for `--sustained-s` (120 s),
long enough for a reader that falls behind the socket to lose it (heartbeat replies later than the
interval), and once more with a backlog of 50, small enough that the oldest changes are dropped
however fast the machine: the flood-beyond-the-backlog path (counted, one WARNING, the reconcile
after, at most one resync event per changed row). "relay CPU µs per change" is per change read
from the socket, stored or dropped.
Writes `bench/RESULTS-flood.md` (none with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

import relay.service
from bench.processes import Upstream, open_upstream_process, read_lines
from bench.report import machine_lines
from bench.upstream import ANON_KEY
from relay.config import Config, load_config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.traffic import Source
from relay.upstream.connection import MAX_BUFFERED_CHANGES
from relay.upstream.supervisor import SupervisorSettings

FACTION = 46001
RATES = (1_000, 2_500, 5_000, 10_000)
# And once more with a backlog small enough that the store, not the reader, falls behind: the path
# of a flood beyond the backlog (drops, `truncated`, the reconcile), measured.
SMALL_BACKLOG_RATES = (5_000,)
SMALL_BACKLOG = 50
SUSTAINED_RATE = 5_000  # issue 16's goal, for `--sustained-s`
HEARTBEAT_S = 25.0  # the relay's default (`upstream.heartbeat_interval_s`)
SAMPLE_S = 0.1
SETTLE_TIMEOUT_S = 60.0  # after the flood: the backlog and the socket drained, the reconcile done
STALLED_S = 5.0  # no change stored or dropped for this long: what is missing was lost with a socket
MAX_COMMAND_BYTES = 4096


# --- the upstream process ----------------------------------------------------------------------


def row_at(faction_id: int, keys: int, n: int) -> dict[str, Any]:
    key = faction_id * 1_000_000 + n % keys
    return {
        "id": key,
        "faction_id": faction_id,
        "war_id": 77,
        "target_id": 2_000_000 + n % keys,
        "target_name": "Target name here",
        "caller_id": 1_000_000 + n,
        "caller_name": f"caller {n}",
        "created_at": "2026-11-24T20:00:00.000+00:00",
    }


async def answer(fake: FakeSupabase, line: str) -> Any:
    words = line.split()
    if words[0] == "flood" and len(words) == 5:
        faction_id, keys, rate, count = (int(word) for word in words[1:])
        started = time.monotonic()
        lag_s = await fake.flood(
            "war_calls", functools.partial(row_at, faction_id, keys), count, per_second=rate
        )
        return {"sent": count, "took_s": time.monotonic() - started, "max_lag_ms": lag_s * 1000}
    if words[0] == "burst" and len(words) == 4:
        faction_id, keys, count = (int(word) for word in words[1:])
        await fake.flood("war_calls", functools.partial(row_at, faction_id, keys), count)
        return {"sent": count}
    if words[0] == "rows" and len(words) == 2:
        faction_id = int(words[1])
        return [row for row in fake.rows("war_calls") if row["faction_id"] == faction_id]
    return {"error": f"unknown command {line!r}"}


async def serve_upstream(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        print(f"url {fake.url}", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            async for line in read_lines(stdin):
                if not line.strip() or line.strip() == "quit":
                    break
                print(json.dumps(await answer(fake, line)), flush=True)
        nursery.cancel_scope.cancel()


# --- the measurement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    rate: int
    backlog: int
    duration_s: float
    sent: int
    stored_live: int
    dropped: int
    reconnects: int
    heartbeat_max_ms: float | None
    heartbeats_seen: int
    stored_lag_max_ms: float
    resync_events: int
    state_matches: bool
    upstream_lag_ms: float
    relay_cpu_percent: float
    relay_cpu_us_per_change: float
    load_average: float
    errors: list[str]


def config_for(directory: Path, url: str, heartbeat_s: float) -> Any:
    toml = directory / "relay.toml"
    toml.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\n[storage]\npath = "{directory / "relay.db"}"\n'
        f"[upstream]\nheartbeat_interval_s = {heartbeat_s}\nreconcile_interval_s = 3600.0\n"
        '[logging]\nlevel = "WARNING"\n'
    )
    return load_config(
        toml, environ={}, overrides={"RELAY_UPSTREAM_URL": url, "RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    )


class LogTally(logging.Handler):
    """The relay's WARNINGs and worse, and whether a traceback came with any, for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.tracebacks += record.exc_info is not None


def stored(running: RunningRelay, source: Source) -> int:
    flow = running.services.traffic.statistics(trio.current_time()).get(FACTION)
    return 0 if flow is None else flow.stored[source]


async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - statistics() snapshots, nothing to wait on
            await trio.sleep(SAMPLE_S)
        return True
    return False


async def until_settled(accounted: Callable[[], int], count: int) -> None:
    """Until every change sent is stored or counted as dropped, or the count stops moving (changes
    in flight when a socket was lost are neither: they show as the difference)."""
    last, still_since = -1, time.monotonic()
    while (now := accounted()) < count and time.monotonic() - still_since < STALLED_S:
        if now != last:
            last, still_since = now, time.monotonic()
        await trio.sleep(SAMPLE_S)


async def ask(upstream: Upstream, command: str, timeout_s: float) -> Any:
    """`Upstream.ask` with a bound to suit a flood that runs longer than its start-up timeout."""
    assert upstream.process.stdin is not None
    async with upstream.lock:
        await upstream.process.stdin.send_all(f"{command}\n".encode())
        with trio.fail_after(timeout_s):
            return json.loads(await anext(upstream.replies))


@contextlib.contextmanager
def backlog_of(changes: int) -> Iterator[None]:
    """The relay with a backlog of `changes`: the config has no key for it (it is a constant, with its
    reason, in relay/upstream/connection.py), so the composition root's settings are wrapped."""
    original = relay.service.supervisor_settings

    def settings(config: Config) -> SupervisorSettings:
        built = original(config)
        connection = dataclasses.replace(built.connection, max_buffered_changes=changes)
        return dataclasses.replace(built, connection=connection)

    relay.service.supervisor_settings = settings
    try:
        yield
    finally:
        relay.service.supervisor_settings = original


async def measure(
    upstream: Upstream,
    rate: int,
    backlog: int,
    duration_s: float,
    keys: int,
    heartbeat_s: float,
    directory: Path,
) -> Result:
    tally = LogTally()
    logging.getLogger("relay").addHandler(tally)
    try:
        async with trio.open_nursery() as nursery:
            with backlog_of(backlog):
                running: RunningRelay = await nursery.start(
                    functools.partial(run_relay, config_for(directory, upstream.url, heartbeat_s))
                )
            result = await flood_one(running, upstream, rate, duration_s, keys, tally)
            result = dataclasses.replace(result, backlog=backlog)
            running.stop()
    finally:
        logging.getLogger("relay").removeHandler(tally)
    return result


async def flood_one(
    running: RunningRelay, upstream: Upstream, rate: int, duration_s: float, keys: int, tally: LogTally
) -> Result:
    def upstream_stats() -> Any:
        return running.supervisors.statistics()[FACTION]

    await running.factions.subscribe(FACTION)
    if not await until(lambda: (upstream_stats().reconcile or _NONE).reconciles >= 1, 30):
        raise RuntimeError("the faction never connected and reconciled")
    reconciles_before = upstream_stats().reconcile.reconciles
    resync_before = stored(running, Source.RECONCILE)
    round_trips: list[float] = []
    lags: list[float] = []  # from the fake's commit_timestamp to stored, newest change per sample

    async def sample(stop: trio.Event) -> None:
        last, since = None, running.store.cursor()
        while not stop.is_set():
            found, since = await running.store.read_since(FACTION, since)
            newest = next((e.data() for e in reversed(found) if e.type == "postgres_changes"), None)
            if newest is not None and not newest.get("resync"):
                lags.append(time.time() - commit_time_s(newest["commit_timestamp"]))
            seen = upstream_stats().heartbeat_round_trip_s
            if seen is not None and seen is not last:
                round_trips.append(seen)
            last = seen
            await trio.sleep(SAMPLE_S)

    stop = trio.Event()
    cpu_before, wall_before = time.process_time(), time.monotonic()
    # Read from the socket: delivered to the store, or dropped from the backlog (a flood beyond it).
    read_before = upstream_stats().changes_received + upstream_stats().changes_dropped
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample, stop)
        count = int(rate * duration_s)
        sent = await ask(upstream, f"flood {FACTION} {keys} {rate} {count}", duration_s * 4 + 60)
        cpu_s = time.process_time() - cpu_before
        cpu_percent = 100 * cpu_s / (time.monotonic() - wall_before)
        read = upstream_stats().changes_received + upstream_stats().changes_dropped - read_before
        load = os.getloadavg()[0]
        await until_settled(
            lambda: stored(running, Source.UPSTREAM) + upstream_stats().changes_dropped, count
        )
        if upstream_stats().changes_dropped or upstream_stats().reconnects:  # a reconcile repairs them
            await until(lambda: upstream_stats().reconcile.reconciles > reconciles_before, SETTLE_TIMEOUT_S)
        stop.set()
    stats = upstream_stats()
    theirs = await ask(upstream, f"rows {FACTION}", 60)
    mine = (await running.store.faction_state(FACTION)).tables["war_calls"]
    return Result(
        rate=rate,
        backlog=MAX_BUFFERED_CHANGES,
        duration_s=duration_s,
        sent=sent["sent"],
        stored_live=stored(running, Source.UPSTREAM),
        dropped=stats.changes_dropped,
        reconnects=stats.reconnects,
        heartbeat_max_ms=max(round_trips) * 1000 if round_trips else None,
        heartbeats_seen=len(round_trips),
        stored_lag_max_ms=max(lags, default=0.0) * 1000,
        resync_events=stored(running, Source.RECONCILE) - resync_before,
        state_matches=by_id(mine) == by_id(theirs),
        upstream_lag_ms=sent["max_lag_ms"],
        relay_cpu_percent=cpu_percent,
        relay_cpu_us_per_change=cpu_s * 1e6 / max(read, 1),
        load_average=load,
        errors=[*tally.messages, *([f"{tally.tracebacks} traceback(s)"] if tally.tracebacks else [])],
    )


@dataclass(frozen=True)
class _NoReconcile:
    reconciles: int = 0


_NONE = _NoReconcile()


def commit_time_s(stamp: str) -> float:
    """Realtime's `commit_timestamp` (UTC, ms, `Z`), the fake's wall clock when it made the change."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row["id"])


async def main(
    scenarios: Sequence[tuple[int, int, float]], keys: int, heartbeat_s: float, pin: bool
) -> list[Result]:
    cpus = sorted(os.sched_getaffinity(0))
    two = pin and len(cpus) >= 2
    if two:
        os.sched_setaffinity(0, {cpus[0]})  # the relay (this process) on one CPU, the upstream on another
    arguments = ["bench.flood", "--serve-upstream", *([f"--cpu={cpus[1]}"] if two else [])]
    results = []
    async with open_upstream_process(arguments) as upstream:
        for rate, backlog, duration_s in scenarios:
            with tempfile.TemporaryDirectory(prefix="bench-flood-") as directory:
                result = await measure(
                    upstream, rate, backlog, duration_s, keys, heartbeat_s, Path(directory)
                )
            print(one_line(result), file=sys.stderr, flush=True)
            results.append(result)
    return results


# --- the report --------------------------------------------------------------------------------


def one_line(result: Result) -> str:
    return (
        f"{result.rate}/s for {result.duration_s:g} s, backlog {result.backlog}: sent {result.sent}, stored {result.stored_live}, dropped {result.dropped}, "
        f"reconnects {result.reconnects}, stored late by max {result.stored_lag_max_ms:.0f} ms, heartbeat max {result.heartbeat_max_ms} ms, "
        f"resync {result.resync_events}, state matches {result.state_matches}, cpu {result.relay_cpu_percent:.0f} %, "
        f"{result.relay_cpu_us_per_change:.0f} µs/change, load {result.load_average:.1f}"
    )


def render(results: Sequence[Result], command: str, keys: int, heartbeat_s: float) -> str:
    lines = ["# Flood: one faction's upstream at N changes/s", ""]
    lines += [f"- {line}" for line in machine_lines()]
    lines += [f"- Command: `{command}`", ""]
    lines += [(__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    lines += [
        f"Rows: {keys:,} keys per faction, so a flood's changes touch at most {keys:,} distinct rows. "
        f"Heartbeat interval: {heartbeat_s:g} s (a reply later than that ends the socket).",
        "",
        "| changes/s | seconds | backlog | sent | stored live | dropped | reconnects | change to stored max ms "
        "| heartbeat round trip max ms (samples) "
        "| resync events after | stored rows = upstream's | relay CPU % | relay CPU µs per change "
        "| machine load (1 min) | upstream late by max ms | relay warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        heartbeat = "—" if r.heartbeat_max_ms is None else f"{r.heartbeat_max_ms:,.1f}"
        warnings = "; ".join(sorted(set(r.errors)))[:300] or "none"
        lines.append(
            f"| {r.rate:,} | {r.duration_s:g} | {r.backlog:,} | {r.sent:,} | {r.stored_live:,} | {r.dropped:,} | {r.reconnects} "
            f"| {r.stored_lag_max_ms:,.0f} "
            f"| {heartbeat} ({r.heartbeats_seen}) | {r.resync_events:,} | {'yes' if r.state_matches else 'NO'} "
            f"| {r.relay_cpu_percent:.0f} | {r.relay_cpu_us_per_change:,.0f} | {r.load_average:.1f} "
            f"| {r.upstream_lag_ms:,.0f} | {warnings} |"
        )
    return "\n".join(lines) + "\n"


def run_cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.flood", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rates", default=",".join(str(rate) for rate in RATES))
    parser.add_argument("--small-backlog-rates", default=",".join(str(rate) for rate in SMALL_BACKLOG_RATES))
    parser.add_argument("--small-backlog", type=int, default=SMALL_BACKLOG)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--sustained-s", type=float, default=120.0, help="5,000/s this long too (0: not)")
    parser.add_argument("--keys", type=int, default=2_000)
    parser.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S)
    parser.add_argument("--no-pin", action="store_true", help="share the CPUs instead of one each")
    parser.add_argument("--quick", action="store_true", help="5,000/s for 5 s; writes nothing")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS-flood.md"))
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        trio.run(serve_upstream, args.cpu)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rates = [5_000] if args.quick else [int(rate) for rate in args.rates.split(",") if rate]
    small = [] if args.quick else [int(r) for r in args.small_backlog_rates.split(",") if r]
    duration = 5.0 if args.quick else args.duration_s
    scenarios = [(rate, MAX_BUFFERED_CHANGES, duration) for rate in rates]
    if args.sustained_s and not args.quick:
        scenarios.append((SUSTAINED_RATE, MAX_BUFFERED_CHANGES, args.sustained_s))
    scenarios += [(rate, args.small_backlog, duration) for rate in small]
    results = trio.run(main, scenarios, args.keys, args.heartbeat_s, not args.no_pin)
    command = " ".join([".venv/bin/python -m bench.flood", *(sys.argv[1:] if argv is None else argv)])
    text = render(results, command, args.keys, args.heartbeat_s)
    print(text)
    if not args.quick:
        args.output.write_text(text)
        print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    try:
        run_cli()
    except KeyboardInterrupt:
        sys.exit(130)
