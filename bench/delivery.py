"""Delivery latency benchmark: upstream frame to client, for long-poll and SSE clients side by side.

Three processes: the relay (`relay serve`, measured alone through /proc), the fake Supabase upstream
(bench/upstream.py: one INSERT per faction every 2 s, staggered, each row carrying `emitted_ns`), and
this load generator (N raw HTTP/1.1 client tasks spread evenly over the factions). Per scenario:
connect every client, warm up, then a measurement window; an event counts when the upstream emitted
it inside the window, and its latency is the client's receive time minus `emitted_ns`.

    .venv/bin/python -m bench.delivery            # 1000 and 5000 clients, long-poll then SSE, 30 s each
    .venv/bin/python -m bench.delivery --quick    # a smoke run: 200 clients, 5 s each, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

if __package__ in (None, ""):  # run as `python bench/delivery.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pyspy
from bench.clients import Connection, Tally, Target, poll_client, sse_client
from bench.probes import Probes
from bench.processes import Relay, Upstream, cpu_seconds, open_relay, open_upstream, rss_bytes
from bench.report import Measurement, ScenarioResult, machine_lines, render
from bench.shortpoll_servers import pin as pin_threads
from bench.upstream import ANON_KEY

FIRST_FACTION = 46001
READY_TIMEOUT_S = 120.0  # every client connected (ramp-up), and every upstream socket live
SAMPLE_EVERY_S = 1.0  # relay RSS samples during a window
SETTLE_S = 3.0  # between scenarios, so one scenario's closing connections do not land in the next
POLL_S = 0.1  # how often the conductor looks at the tallies
BASELINE_MAX_S = 10.0  # the ingest-only window: the relay is idle but for the upstream
WARMUP_STEP_S = 2.0
MAX_EXTRA_WARMUP_S = 60.0  # beyond --warmup-s, while the latency is still falling
DRAINING_SHARE = 0.8  # a step whose median latency is below this share of the one before: still draining
END_OF_TIME_NS = 2**63
PROFILE_TOP = 30  # functions listed in a profile summary, by self and by inclusive samples
HELD_SLACK = 1_000  # held requests allowed beyond the clients: a reconnect overlaps its old request
# Descriptors the relay wants beyond its held requests (it refuses to start without them: upstream
# sockets, the database, its reserve).
RELAY_DESCRIPTORS_SPARE = HELD_SLACK + 1_000
# - max_held_requests: the relay's default cap (10,000) would refuse the largest runs' reconnects; the
#   benchmark measures delivery, not the cap.
# - reconcile_interval_s: bench/upstream.py drops each row from its table right after announcing it (so
#   that the table stays small), so a periodic reconcile would rightly find every row deleted upstream
#   and send each client a DELETE per row. The reconcile after subscribing still runs.
RELAY_EXTRA_CONFIG = """\
[limits]
max_held_requests = {max_held}

[upstream]
reconcile_interval_s = 86400.0
"""
KINDS = ("poll", "longpoll", "sse")


@dataclass(frozen=True)
class Plan:
    kinds: Sequence[str]
    clients: Sequence[int]
    factions: int
    interval_s: float
    warmup_s: float
    duration_s: float
    grace_s: float
    wait_s: float
    connect_concurrency: int
    pin: bool
    gc_probe: bool
    relay_setup: str | None
    profile: Path | None = None  # py-spy's summary of the relay during each window is appended here


async def call(target: Target, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request on its own connection, for set-up and checks (not measured)."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    with trio.fail_after(READY_TIMEOUT_S):
        async with await trio.open_tcp_stream(target.host, target.port) as stream:
            await stream.send_all(head.encode() + payload)
            connection = Connection(stream)
            answer = await connection.read_head()
            return answer.status, json.loads(await connection.read_body(answer))


async def subscribe_all(target: Target, factions: Sequence[int]) -> None:
    """Subscribe every faction, then wait until each one's upstream socket is live."""
    for faction_id in factions:
        status, answer = await call(
            target, "POST", "/subscribe", {"faction_id": faction_id, "api_key": ANON_KEY}
        )
        if status != 200:
            raise RuntimeError(f"/subscribe {faction_id} answered {status}: {answer}")

    states: list[str] = []
    for _ in range(int(READY_TIMEOUT_S / POLL_S)):
        answered, status_page = await call(target, "GET", "/status")
        if answered == 429:  # /status costs a tenth of the address's rate (issue 13): ask again later
            await trio.sleep(POLL_S)
            continue
        states = [faction["upstream"]["state"] for faction in status_page["factions"]]
        if states.count("connected") == len(factions):
            return
        await trio.sleep(POLL_S)
    raise RuntimeError(f"upstream sockets still not all live after {READY_TIMEOUT_S:g} s: {states}")


async def measure_window(
    relay: Relay, upstream: Upstream, target: Target, duration_s: float, idle_rss: int
) -> Measurement:
    """CPU of the relay, this process and the upstream across the window; the relay's largest RSS in it;
    the probes (this process's loop lag, the relay's /ping round trips) alongside.
    """
    probes = Probes()
    started, started_ns = time.monotonic(), time.time_ns()
    relay_cpu, upstream_cpu, own_cpu = cpu_seconds(relay.pid), cpu_seconds(upstream.pid), own_cpu_seconds()
    peak_rss = rss_bytes(relay.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probes.watch_loop, duration_s)
        nursery.start_soon(probes.ping, target, duration_s)
        for _ in range(int(duration_s / SAMPLE_EVERY_S)):
            await trio.sleep(SAMPLE_EVERY_S)
            peak_rss = max(peak_rss, rss_bytes(relay.pid))
        await trio.sleep(max(0.0, duration_s - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        relay_cpu = cpu_seconds(relay.pid) - relay_cpu
        upstream_cpu = cpu_seconds(upstream.pid) - upstream_cpu
        own_cpu = own_cpu_seconds() - own_cpu
        nursery.cancel_scope.cancel()
    return Measurement(
        elapsed_s=elapsed,
        relay_cpu_s=relay_cpu,
        upstream_cpu_s=upstream_cpu,
        loadgen_cpu_s=own_cpu,
        relay_rss_bytes=max(peak_rss, rss_bytes(relay.pid)),
        relay_idle_rss_bytes=idle_rss,
        probes=probes,
        relay_gc=relay.gc_pauses(started_ns, time.time_ns()),
    )


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Check every POLL_S, for at most `timeout_s`; whether the predicate came true."""
    for _ in range(int(timeout_s / POLL_S) + 1):
        if predicate():
            return True
        await trio.sleep(POLL_S)
    return predicate()


async def warm_up(tally: Tally, minimum_s: float) -> float:
    """At least `minimum_s`, and on while the clients' median latency is still falling step by step
    (the relay draining what piled up during ramp-up), so the window sees the steady state; how long."""
    started = time.monotonic()
    tally.restart_window(time.time_ns(), END_OF_TIME_NS)
    previous: int | None = None
    for _ in range(int((minimum_s + MAX_EXTRA_WARMUP_S) / WARMUP_STEP_S)):
        mark = len(tally.latencies_ns)
        await trio.sleep(WARMUP_STEP_S)
        step = sorted(tally.latencies_ns[mark:])
        median = step[len(step) // 2] if step else None
        draining = previous is not None and median is not None and median < DRAINING_SHARE * previous
        if time.monotonic() - started >= minimum_s and not draining:
            break
        previous = median
    return time.monotonic() - started


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_task(kind: str, plan: Plan, cursor: int) -> Callable[[Target, Tally, int, int], Any]:
    if kind == "sse":
        return sse_client
    wait_s = plan.wait_s if kind == "longpoll" else 0.0
    return functools.partial(_poller, since=cursor, wait_s=wait_s)


async def _poller(
    target: Target, tally: Tally, number: int, faction_id: int, *, since: int, wait_s: float
) -> None:
    await poll_client(target, tally, number, faction_id, since, wait_s)


async def run_scenario(
    kind: str, n: int, plan: Plan, relay: Relay, upstream: Upstream, factions: Sequence[int]
) -> ScenarioResult:
    target = relay_target(relay, plan.connect_concurrency)
    idle_rss = rss_bytes(relay.pid)
    _, answer = await call(target, "POST", "/subscribe", {"faction_id": factions[0], "api_key": ANON_KEY})
    task = client_task(kind, plan, int(answer["timestamp"]))
    tally = Tally()
    assigned = [factions[i % len(factions)] for i in range(n)]
    ramp_started = time.monotonic()
    async with trio.open_nursery() as clients:
        for number, faction_id in enumerate(assigned):
            clients.start_soon(task, target, tally, number, faction_id)
        await wait_until(lambda: tally.ready >= n, READY_TIMEOUT_S)
        ramp_s = time.monotonic() - ramp_started
        # This process's own collections over thousands of client tasks would stall every client at
        # once and be charged to the relay: no collection during the window (the garbage of a
        # minute's cycles is a few MB), and what exists now is kept out of the collector for good.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            warmup_s = await warm_up(tally, plan.warmup_s)
            now_ns = time.time_ns()
            tally.restart_window(now_ns, now_ns + int(plan.duration_s * 1e9))
            if plan.profile is None:
                measurement = await measure_window(relay, upstream, target, plan.duration_s, idle_rss)
            else:
                measurement = await measure_profiled_window(
                    kind, n, plan, plan.profile, relay, upstream, idle_rss
                )
            emitted = await upstream.count(tally.window_from_ns, tally.window_to_ns)
            expected = sum(emitted[faction_id] for faction_id in assigned)
            # The window's last events are still on their way.
            await wait_until(lambda: sum(tally.delivered.values()) >= expected, plan.grace_s)
        finally:
            gc.enable()
            gc.unfreeze()
        clients.cancel_scope.cancel()
    return ScenarioResult(kind, n, tally, expected, sum(emitted.values()), ramp_s, warmup_s, measurement)


async def measure_profiled_window(
    kind: str, n: int, plan: Plan, profile: Path, relay: Relay, upstream: Upstream, idle_rss: int
) -> Measurement:
    """The window with py-spy sampling the relay throughout; its summary is appended to `profile`.
    py-spy pauses the relay for each sample, so a profiled run's figures are not the results'."""
    results: list[Measurement] = []
    raw = profile.with_suffix(".raw.txt")

    async def window() -> None:
        results.append(
            await measure_window(relay, upstream, relay_target(relay, 1), plan.duration_s, idle_rss)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(window)
        await pyspy.record(relay.pid, plan.duration_s, raw)
    summary = pyspy.summary_lines(pyspy.summarize(raw.read_text()), PROFILE_TOP)
    raw.unlink()
    with profile.open("a") as out:
        out.write(
            "\n".join(
                [
                    f"## {kind}, {n} clients: the relay during a {plan.duration_s:.0f} s window",
                    "",
                    *summary,
                    "",
                    "",
                ]
            )
        )
    return results[0]


async def run_baseline(relay: Relay, upstream: Upstream, plan: Plan) -> ScenarioResult:
    """The relay with no clients: what ingesting the upstream changes alone costs."""
    duration_s = min(plan.duration_s, BASELINE_MAX_S)
    tally = Tally()
    tally.window_from_ns = time.time_ns()
    tally.window_to_ns = tally.window_from_ns + int(duration_s * 1e9)
    measurement = await measure_window(
        relay, upstream, relay_target(relay, 1), duration_s, rss_bytes(relay.pid)
    )
    emitted = await upstream.count(tally.window_from_ns, tally.window_to_ns)
    return ScenarioResult("ingest only", 0, tally, 0, sum(emitted.values()), 0.0, 0.0, measurement)


def relay_target(relay: Relay, connect_concurrency: int) -> Target:
    address = urlsplit(relay.url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    return Target(host, port, trio.CapacityLimiter(connect_concurrency))


async def run_plan(plan: Plan, on_result: Callable[[ScenarioResult], None]) -> list[ScenarioResult]:
    """Every scenario against a fresh relay process (same build), so that one scenario's memory,
    which CPython keeps once it has grown, is not charged to the next; one upstream for all."""
    factions = list(range(FIRST_FACTION, FIRST_FACTION + plan.factions))
    scenarios = [("ingest only", 0)] + [(kind, n) for kind in plan.kinds for n in plan.clients]
    results: list[ScenarioResult] = []
    async with open_upstream(FIRST_FACTION, plan.factions, plan.interval_s) as upstream:
        for kind, n in scenarios:
            with tempfile.TemporaryDirectory(prefix="cat-relay-bench-") as data_dir:
                async with open_relay(
                    upstream.url,
                    Path(data_dir),
                    gc_probe=plan.gc_probe,
                    setup=plan.relay_setup,
                    extra_config=RELAY_EXTRA_CONFIG.format(max_held=n + HELD_SLACK),
                ) as relay:
                    if plan.pin:
                        pin(relay.pid, upstream.pid)
                    await subscribe_all(relay_target(relay, 1), factions)
                    await trio.sleep(SETTLE_S)
                    if n == 0:
                        result = await run_baseline(relay, upstream, plan)
                    else:
                        result = await run_scenario(kind, n, plan, relay, upstream, factions)
                    if relay.warnings:
                        print("relay warnings:\n  " + "\n  ".join(relay.warnings[:20]), file=sys.stderr)
            results.append(result)
            on_result(result)
        print(f"upstream emitter: {await upstream.ask('stats')}", file=sys.stderr)
    return results


# The CPUs this benchmark may use, as it started: once it has pinned itself away from the relay's
# CPU its own affinity no longer says (and every relay it starts later inherits that affinity).
BENCH_CPUS = sorted(os.sched_getaffinity(0))


def pin(relay_pid: int, upstream_pid: int) -> None:
    """The relay (every thread of it) alone on the first CPU; this process and the upstream on the others."""
    if len(BENCH_CPUS) < 2:
        return
    pin_threads(relay_pid, BENCH_CPUS[:1])
    for pid in (os.getpid(), upstream_pid):
        pin_threads(pid, BENCH_CPUS[1:])


def raise_open_files_limit(wanted: int = 0) -> int:
    """Each client holds a socket here and one in the relay: lift the soft limit to the hard one, and
    the hard one to `wanted` where this process may (root; these VMs start at 20,000, below the
    clients an SSE capacity run needs). Inherited by the relay we start; returns the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # not allowed: keep the limit we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            soft = hard = wanted
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return sys.maxsize if hard == resource.RLIM_INFINITY else hard


async def main(plan: Plan, command: str) -> str | None:
    """The report, or None when a signal stopped the run (after both children were stopped)."""
    machine = machine_lines()
    results: list[ScenarioResult] | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            results = await run_plan(
                plan, lambda result: print(result.one_line(), file=sys.stderr, flush=True)
            )
            nursery.cancel_scope.cancel()
    if results is None:
        return None
    return render(results, plan_lines(plan), machine, command)


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        print(f"bench: {signal.Signals(signum).name}: stopping the relay and the upstream", file=sys.stderr)
        scope.cancel()
        return


def plan_lines(plan: Plan) -> list[str]:
    return [
        f"{plan.factions} factions, one upstream INSERT per faction every {plan.interval_s:g} s, staggered "
        f"({plan.factions / plan.interval_s:g} changes/s); clients spread evenly over the factions.",
        "Each scenario gets a fresh relay process (same build, new database), subscribed and settled "
        f"before its clients come. Per scenario: ramp-up (at most {plan.connect_concurrency} connects in flight), {plan.warmup_s:g} s warm-up or longer while the median latency is still falling "
        f"(up to {MAX_EXTRA_WARMUP_S:g} s more), "
        f"{plan.duration_s:g} s measured, up to {plan.grace_s:g} s grace for the window's last events.",
        "long-poll: `GET /events?faction_id&since&wait="
        f"{plan.wait_s:g}`, re-requested at once with the answer's cursor on a keep-alive connection; "
        "SSE: `GET /events/stream`; poll: today's userscript, a plain poll every 3 s. Each client connects "
        "from its own loopback address (127.1.x.y), as members do, so the relay's per-address limit sees one member.",
        "The load generator freezes its heap (`gc.freeze()`) after ramp-up and collects nothing during the "
        "window, so that its own collections do not stall every client at once; the relay's collections are logged by a `sitecustomize` probe"
        + ("." if plan.gc_probe else " (switched off for this run).")
        + (f" The relay ran `{plan.relay_setup}` at start-up." if plan.relay_setup else ""),
        "CPU pinning: relay alone on CPU 0, load generator and fake upstream on CPU 1."
        if plan.pin
        else "No CPU pinning: the relay, the load generator and the fake upstream share every CPU.",
    ]


def parse_args(argv: Sequence[str]) -> tuple[Plan, Path | None]:
    parser = argparse.ArgumentParser(prog="bench.delivery", description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 200 clients, 2 s warm-up, 5 s window"
    )
    parser.add_argument("--kinds", default="longpoll,sse", help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 1000,5000)")
    parser.add_argument("--factions", type=int, default=100)
    parser.add_argument("--interval-s", type=float, default=2.0, help="per faction, between upstream changes")
    parser.add_argument("--warmup-s", type=float, default=None)
    parser.add_argument("--duration-s", type=float, default=None, help="measured window per scenario")
    parser.add_argument("--grace-s", type=float, default=5.0)
    parser.add_argument("--wait-s", type=float, default=25.0, help="long-poll wait=")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="don't pin the relay to its own CPU"
    )
    parser.add_argument(
        "--relay-setup",
        default=None,
        help="Python run in the relay at start-up, to try a tuning: 'import gc; gc.set_threshold(20000, 50, 100)'",
    )
    parser.add_argument(
        "--no-gc-probe",
        dest="gc_probe",
        action="store_false",
        help="don't log the relay's garbage collections",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="default bench/RESULTS.md (none with --quick or --profile)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample the relay with py-spy during every window and write the summaries here "
        "(the figures of a profiled run are perturbed and written nowhere else unless --output)",
    )
    args = parser.parse_args(argv)
    if args.relay_setup and not args.gc_probe:
        parser.error("--relay-setup runs through the GC probe: drop --no-gc-probe")
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    clients = args.clients or ("200" if args.quick else "1000,5000")
    plan = Plan(
        kinds=kinds,
        clients=[int(n) for n in clients.split(",")],
        factions=args.factions,
        interval_s=args.interval_s,
        warmup_s=args.warmup_s if args.warmup_s is not None else (2.0 if args.quick else 5.0),
        duration_s=args.duration_s if args.duration_s is not None else (5.0 if args.quick else 30.0),
        grace_s=args.grace_s,
        wait_s=args.wait_s,
        connect_concurrency=args.connect_concurrency,
        pin=args.pin,
        gc_probe=args.gc_probe,
        relay_setup=args.relay_setup,
        profile=args.profile,
    )
    default_output = None if args.quick or args.profile else Path(__file__).with_name("RESULTS.md")
    output = args.output or default_output
    return plan, output


def run(argv: Sequence[str] | None = None) -> int:
    plan, output = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.orig_argv[1:]])
    needed = max(plan.clients) + plan.factions + 100
    limit = raise_open_files_limit(needed + RELAY_DESCRIPTORS_SPARE)
    if limit < needed:
        print(f"bench: RLIMIT_NOFILE hard limit {limit} < {needed} needed", file=sys.stderr)
        return 2
    if plan.profile is not None:
        plan.profile.write_text(
            f"# Profile: the relay while it delivers\n\n- Command: `{command}`\n"
            f"- py-spy {pyspy.SAMPLES_PER_S} samples/s of the relay process (all threads); self = the function "
            "on top of the stack, inclusive = anywhere in it.\n\n"
        )
    text = trio.run(main, plan, command)
    if text is None:
        return 130
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run())
