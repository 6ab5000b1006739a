"""What the relay's memory grows by per held client and per idle faction, read from /proc.

Each measurement is one fresh `relay serve` (CPython keeps memory once grown, so a relay shared by two
measurements would charge the first one's peak to the second): its memory settled before, then
settled again with the clients held (or the factions live and reconciled), against a quiet fake
upstream, so that nothing answers a held client but its `wait` running out.

RSS is every page of the process resident now, all threads together: the interpreter, the shared
libraries, the SQLite page caches, each worker thread's touched stack. PSS divides shared pages among
the processes sharing them; USS is the private pages alone (`/proc/PID/smaps_rollup`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from bench.allocations import Growth, Snapshots, growth, setup_code
from bench.clients import Connection, Tally, Target, poll_client, sse_client
from bench.processes import Relay, Upstream, open_relay, rss_bytes
from bench.upstream import ANON_KEY

CALL_TIMEOUT_S = 30.0
SUBSCRIBES_IN_FLIGHT = 8
# /subscribe is rate-limited per address (a burst of 120 by default): the set-up spreads its
# subscriptions over a few loopback addresses of its own, apart from the clients' 127.1.x.y.
SUBSCRIBES_PER_ADDRESS = 100
STATUS_EVERY_S = 0.5
LIVE_SLACK_S = 60.0  # beyond the joins' pacing, for every socket to come up and reconcile
READY_TIMEOUT_S = 180.0  # every client connected and its first request sent (10,000 at ~200/s)
HELD_TIMEOUT_S = 60.0  # then every connection accepted by the relay
CHECK_EVERY_S = 0.5
SETTLE_STEP_S = 1.0
SETTLE_GROWTH_BYTES = 512 * 1024  # RSS grown less than this in a step: settled
SETTLE_MAX_S = 30.0
SAMPLE_EVERY_S = 0.5
HELD_SLACK = 1000  # limits.max_held_requests above the clients, so none is refused


@dataclass(frozen=True)
class Memory:
    rss: int
    pss: int
    uss: int
    threads: int


def memory(pid: int) -> Memory:
    sizes: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:  # after the [rollup] line
        name, value, *_ = line.split()
        sizes[name.rstrip(":")] = int(value) * 1024
    threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    uss = sizes["Private_Clean"] + sizes["Private_Dirty"]
    return Memory(sizes["Rss"], sizes["Pss"], uss, threads)


def socket_count(pid: int) -> int:
    """Open sockets of the process: its listener, upstream sockets, and every accepted client."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since it was listed
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


@dataclass(frozen=True)
class Settled:
    memory: Memory  # the sample with the largest RSS in the hold window
    settled: bool  # RSS stopped growing before SETTLE_MAX_S


async def settled_memory(pid: int, hold_s: float) -> Settled:
    """Wait until the RSS stops growing, then sample for `hold_s`; the largest sample."""
    previous, settled = rss_bytes(pid), False
    with trio.move_on_after(SETTLE_MAX_S):
        while not settled:
            await trio.sleep(SETTLE_STEP_S)
            current = rss_bytes(pid)
            settled, previous = current - previous < SETTLE_GROWTH_BYTES, current
    samples = []
    for _ in range(max(1, round(hold_s / SAMPLE_EVERY_S))):
        samples.append(memory(pid))
        await trio.sleep(SAMPLE_EVERY_S)
    return Settled(max(samples, key=lambda sample: sample.rss), settled)


async def json_call(
    target: Target, method: str, path: str, body: Any = None, source: str | None = None
) -> tuple[int, Any]:
    """One request on its own connection, for set-up and checks (not measured)."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    with trio.fail_after(CALL_TIMEOUT_S):
        stream = await trio.open_tcp_stream(target.host, target.port, local_address=source)
        async with stream:
            await stream.send_all(head.encode() + payload)
            connection = Connection(stream)
            answer = await connection.read_head()
            return answer.status, json.loads(await connection.read_body(answer))


async def subscribe(target: Target, factions: Sequence[int]) -> int:
    """POST /subscribe for each faction, a few at a time; the largest cursor answered."""
    cursors: list[int] = []
    limiter = trio.CapacityLimiter(SUBSCRIBES_IN_FLIGHT)

    async def one(index: int, faction_id: int) -> None:
        source = f"127.0.1.{index // SUBSCRIBES_PER_ADDRESS + 1}"
        async with limiter:
            body = {"faction_id": faction_id, "api_key": ANON_KEY}
            status, answer = await json_call(target, "POST", "/subscribe", body, source)
        if status != 200:
            raise RuntimeError(f"/subscribe {faction_id} answered {status}: {answer}")
        cursors.append(int(answer["timestamp"]))

    async with trio.open_nursery() as nursery:
        for index, faction_id in enumerate(factions):
            nursery.start_soon(one, index, faction_id)
    return max(cursors)


async def status_factions(target: Target) -> list[dict[str, Any]]:
    status, document = await json_call(target, "GET", "/status")
    while status == 429:  # /status costs a tenth of the address's rate (issue 13): ask again later
        await trio.sleep(STATUS_EVERY_S)
        status, document = await json_call(target, "GET", "/status")
    if status != 200:
        raise RuntimeError(f"/status answered {status}: {document}")
    factions: list[dict[str, Any]] = document["factions"]
    return factions


async def wait_factions(
    target: Target, factions: int, budget_s: float, *, reconciled: bool, every_s: float = STATUS_EVERY_S
) -> list[dict[str, Any]]:
    """/status until `factions` have their upstream socket live (and, if asked, their first reconcile
    done); the faction entries of the last read."""
    entries: list[dict[str, Any]] = []
    with trio.move_on_after(budget_s):
        while True:
            entries = await status_factions(target)
            ready = [
                entry
                for entry in entries
                if entry["upstream"]["state"] == "connected"
                and (entry["reconcile"]["reconciles"] > 0 or not reconciled)
            ]
            if len(ready) >= factions:
                return entries
            await trio.sleep(every_s)
    raise RuntimeError(f"of {factions} factions, not all live after {budget_s:g} s: {len(entries)} listed")


async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Check every CHECK_EVERY_S, for at most `timeout_s`; whether the predicate came true."""
    for _ in range(int(timeout_s / CHECK_EVERY_S)):
        if predicate():
            return True
        await trio.sleep(CHECK_EVERY_S)
    return predicate()


def control_target(relay: Relay, connect_concurrency: int = 1) -> Target:
    address = urlsplit(relay.url)
    return Target(
        address.hostname or "127.0.0.1", address.port or 80, trio.CapacityLimiter(connect_concurrency)
    )


@dataclass(frozen=True)
class Settings:
    """What every memory measurement shares."""

    upstream: Upstream
    joins_per_second: float
    hold_s: float
    wait_s: float  # the long-polls' wait=
    connect_concurrency: int
    pin: Callable[[int], None]  # puts the relay on its CPU
    tracemalloc: bool = False  # trace the relay's allocations (which makes it larger)


@dataclass(frozen=True)
class ClientFootprint:
    kind: str
    clients: int
    before: Settled
    held: Settled
    held_sockets: int  # client connections the relay had open at the end
    ramp_s: float
    errors: Counter[str]
    gave_up: int
    allocations: Growth | None = None


@dataclass(frozen=True)
class FactionFootprint:
    factions: int
    before: Settled
    live: Settled
    ready_s: float  # subscribing to every socket live and reconciled
    allocations: Growth | None = None


def relay_config(*, max_factions: int, max_held: int, joins_per_second: float) -> str:
    return (
        f"\n[limits]\nmax_factions = {max_factions}\nmax_held_requests = {max_held}\n"
        f"\n[upstream]\njoins_per_second = {joins_per_second}\n"
    )


def client_task(kind: str, cursor: int, wait_s: float) -> Callable[[Target, Tally, int, int], Any]:
    if kind == "sse":
        return sse_client
    return functools.partial(_long_poller, since=cursor, wait_s=wait_s)


async def _long_poller(
    target: Target, tally: Tally, number: int, faction_id: int, *, since: int, wait_s: float
) -> None:
    await poll_client(target, tally, number, faction_id, since, wait_s)


async def measure_clients(kind: str, n: int, factions: Sequence[int], settings: Settings) -> ClientFootprint:
    """A fresh relay with `factions` live and idle; its memory before and with `n` clients held."""
    config = relay_config(
        max_factions=len(factions), max_held=n + HELD_SLACK, joins_per_second=settings.joins_per_second
    )
    async with fresh_relay(settings, config) as (relay, snapshots):
        control = control_target(relay)
        cursor = await subscribe(control, factions)
        budget_s = 2 * len(factions) / settings.joins_per_second + LIVE_SLACK_S
        await wait_factions(control, len(factions), budget_s, reconciled=True)
        before = await settled_memory(relay.pid, settings.hold_s)
        first = await snapshots.take() if snapshots else None
        idle_sockets = socket_count(relay.pid)
        tally = Tally()
        task = client_task(kind, cursor, settings.wait_s)
        target = control_target(relay, settings.connect_concurrency)
        started = time.monotonic()
        async with trio.open_nursery() as clients:
            for number in range(n):
                clients.start_soon(task, target, tally, number, factions[number % len(factions)])
            await wait_for(lambda: tally.ready >= n, READY_TIMEOUT_S)
            ramp_s = time.monotonic() - started
            await wait_for(lambda: socket_count(relay.pid) >= idle_sockets + n, HELD_TIMEOUT_S)
            held = await settled_memory(relay.pid, settings.hold_s)
            held_sockets = socket_count(relay.pid) - idle_sockets
            allocations = growth(first, await snapshots.take(), "client", n) if snapshots and first else None
            clients.cancel_scope.cancel()
    return ClientFootprint(
        kind, n, before, held, held_sockets, ramp_s, tally.errors, tally.gave_up, allocations
    )


async def measure_factions(factions: Sequence[int], settings: Settings) -> FactionFootprint:
    """A fresh relay, warmed by a few requests; its memory before and with `factions` live and reconciled."""
    config = relay_config(
        max_factions=len(factions), max_held=HELD_SLACK, joins_per_second=settings.joins_per_second
    )
    async with fresh_relay(settings, config) as (relay, snapshots):
        control = control_target(relay)
        for path in ("/ping", "/status", "/health"):  # the HTTP side's first-request costs
            await json_call(control, "GET", path)
        before = await settled_memory(relay.pid, settings.hold_s)
        first = await snapshots.take() if snapshots else None
        started = time.monotonic()
        await subscribe(control, factions)
        budget_s = 2 * len(factions) / settings.joins_per_second + LIVE_SLACK_S
        await wait_factions(control, len(factions), budget_s, reconciled=True)
        ready_s = time.monotonic() - started
        live = await settled_memory(relay.pid, settings.hold_s)
        allocations = (
            growth(first, await snapshots.take(), "faction", len(factions)) if snapshots and first else None
        )
    return FactionFootprint(len(factions), before, live, ready_s, allocations)


@asynccontextmanager
async def fresh_relay(settings: Settings, config: str) -> AsyncIterator[tuple[Relay, Snapshots | None]]:
    """`relay serve` with a new database in a temporary folder, pinned; tracing if asked."""
    with tempfile.TemporaryDirectory(prefix="cat-relay-footprint-") as temporary:
        data_dir = Path(temporary)
        setup = setup_code(data_dir) if settings.tracemalloc else None
        async with open_relay(
            settings.upstream.url, data_dir, gc_probe=settings.tracemalloc, setup=setup, extra_config=config
        ) as relay:
            settings.pin(relay.pid)
            try:
                yield relay, Snapshots(relay, data_dir) if settings.tracemalloc else None
            finally:
                report_warnings(relay)


def report_warnings(relay: Relay) -> None:
    """The relay's WARNING and ERROR lines, if it logged any: a measurement to look at twice."""
    if relay.warnings:
        print("relay warnings:\n  " + "\n  ".join(relay.warnings[:20]), file=sys.stderr)
