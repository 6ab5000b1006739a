"""The composition root: `build_services` wires the relay's parts, `run_relay` starts them in one
nursery and stops them in order. Nothing here has behaviour of its own; the tree, the path of one
change and the invariants are drawn in docs/architecture.md.

    trio.run(run_relay)
    ├── watch_signals → hub.begin_stopping              # SIGINT/SIGTERM; a second one cuts short,
    │                                                   # also while sockets and the store close
    └── async with open_configured_store(config), httpx client   # closed last: committer drained, checkpoint
        └── nursery "relay"
            ├── Supervisors.run (its own nursery)
            │   ├── FactionSupervisor(46666) ── upstream connection (reader + heartbeat)
            │   │                            └── reconciler (REST reads), while live
            │   └── SharedDeletes ── the relay-wide DELETE channels, routed by key
            ├── run_schedule(maintenance_pass)
            ├── run_schedule(YoungGarbage.look)       # cycles holding large buffers: when memory grew
            ├── hub.wake_quiet_factions_every         # SSE keep-alives: one timer for all streams
            └── relay.http.server.serve(app)          # hypercorn's HTTP/1.1 protocol on the relay's sockets

Shutdown: `stopping` is set, so held requests return at once; the HTTP server stops accepting,
closes idle connections, answers what is in flight and cuts whatever is still open after
GRACEFUL_TIMEOUT_S (writes are never shielded, so a client that stopped reading cannot hold it);
then the supervisors and the schedule are cancelled (each upstream socket closes politely within a
bounded, shielded wait); last, the store checkpoints and closes.
"""

from __future__ import annotations

import functools
import logging
import random
import signal
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from quart_trio import QuartTrio

import relay
from relay.config import Config
from relay.factions import Factions
from relay.http.api import RelayApp, create_app
from relay.http.delivery import SSE_KEEPALIVE_S, HeldRequests
from relay.http.descriptors import max_connections, open_file_limit
from relay.http.hotpath import HotPath
from relay.http.ratelimit import RateLimiter
from relay.http.server import hypercorn_config, serve
from relay.http.stats import ConnectionCounters, HttpCounters
from relay.hub import Hub
from relay.ingest import Ingest
from relay.maintenance import maintenance_pass, run_schedule
from relay.memory import COLLECT_EVERY_S, YoungGarbage
from relay.storage.store import Store, open_store, wall_clock_ms
from relay.traffic import Traffic
from relay.upstream.connection import ConnectionSettings
from relay.upstream.deafness import DeafWatch
from relay.upstream.reconcile import Reconciling
from relay.upstream.snapshot import RestSettings, probe_rows, read_rows
from relay.upstream.supervisor import Supervisors, SupervisorSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """The relay's parts as the HTTP side sees them, built by `build_services`."""

    config: Config
    store: Store
    factions: Factions
    supervisors: Supervisors
    ingest: Ingest
    hub: Hub
    held: HeldRequests
    limiter: RateLimiter
    traffic: Traffic
    http: HttpCounters
    version: str
    started_at: float  # trio clock
    wall_clock_ms: Callable[[], int]
    deafness: DeafWatch | None = None  # None while probes are off (upstream.probe_interval_s = 0)


@dataclass(frozen=True, slots=True)
class BuiltRelay:
    """A relay's app and the services behind it, built and not started: what the HTTP-contract tests
    drive through Quart's test client."""

    app: RelayApp
    services: Services

    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def supervisors(self) -> Supervisors:
        return self.services.supervisors

    @property
    def factions(self) -> Factions:
        return self.services.factions

    @property
    def hub(self) -> Hub:
        return self.services.hub


@dataclass(frozen=True, slots=True)
class RunningRelay(BuiltRelay):
    """What a started relay hands its starter: also where it listens and how to stop it."""

    urls: Sequence[str]
    # The hot read paths (relay.http.hotpath), None with `server.hot_path = false`; tests turn it off
    # and on to compare the two paths.
    hot_path: HotPath | None = None

    @property
    def url(self) -> str:
        return self.urls[0]

    def stop(self) -> None:
        self.hub.begin_stopping()


def supervisor_settings(config: Config) -> SupervisorSettings:
    upstream = config.upstream
    return SupervisorSettings(
        connection=ConnectionSettings(
            url=upstream.url,
            api_key=upstream.anon_key,
            heartbeat_interval_s=upstream.heartbeat_interval_s,
            connect_timeout_s=upstream.connect_timeout_s,
        ),
        channels=upstream.channels,
        backoff_initial_s=upstream.backoff_initial_s,
        backoff_max_s=upstream.backoff_max_s,
        joins_per_second=upstream.joins_per_second,
    )


async def run_relay(
    config: Config,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until stopped (a signal, or `RunningRelay.stop`); return once everything is closed."""
    hub = Hub()
    if not handle_signals:
        await _run_relay(config, hub, task_status=task_status)
    else:
        # Signals are watched from first to last: a second one cancels whatever can still be cut,
        # also while the upstream sockets and the store close (bounded, shielded waits), and is never
        # left to its default action, which would kill the relay in the middle of its final checkpoint.
        stop_now = trio.CancelScope()
        try:
            async with trio.open_nursery() as signals:
                signals.start_soon(watch_signals, hub, stop_now, name="watch_signals")
                with stop_now:
                    await _run_relay(config, hub, task_status=task_status)
                signals.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A start-up refusal (MigrationError, StoreError) leaves as itself, for the CLI's one line.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    log.info("relay stopped")


def open_configured_store(config: Config) -> AbstractAsyncContextManager[Store]:
    return open_store(
        config.storage.path,
        retention=config.retention,
        now_ms=wall_clock_ms,
        key_columns=config.upstream.key_columns,
    )


def build_services(
    config: Config,
    *,
    store: Store,
    rest_client: httpx.AsyncClient,
    hub: Hub | None = None,
    wall_clock_ms: Callable[[], int] = wall_clock_ms,
    rng: random.Random | None = None,
) -> Services:
    """Everything the relay runs, wired and not yet started: `run_relay` starts the long-lived parts,
    and the HTTP-contract tests hand it to `create_app` without starting any (no socket is opened).
    `run_relay` brings its own `hub`: a signal can ask it to stop while the store is still opening."""
    upstream = config.upstream
    hub = hub or Hub()
    traffic = Traffic()
    ingest = Ingest(store, hub, traffic, key_columns=upstream.key_columns, channels=upstream.channels)
    rest = RestSettings(upstream.rest_base, upstream.anon_key, upstream.connect_timeout_s)
    deafness = (
        DeafWatch(
            upstream.channels,
            functools.partial(probe_rows, rest_client, rest),
            interval_s=upstream.probe_interval_s,
            grace_s=upstream.probe_grace_s,
            wall_clock_ms=wall_clock_ms,
        )
        if upstream.probe_interval_s > 0
        else None
    )
    reconciling = Reconciling(
        upstream.channels,
        functools.partial(read_rows, rest_client, rest),
        ingest,
        interval_s=upstream.reconcile_interval_s,
        backoff_initial_s=upstream.backoff_initial_s,
        backoff_max_s=upstream.backoff_max_s,
        wall_clock_ms=wall_clock_ms,
        watch=deafness,
    )
    supervisors = Supervisors(
        supervisor_settings(config),
        ingest.upstream,
        rng=rng,
        wall_clock_ms=wall_clock_ms,
        reconciler_for=reconciling.for_faction,
        route_shared_deletes=ingest.route_shared_deletes,
        on_lost=ingest.changes_lost,
    )
    if deafness is not None:
        deafness.on_deaf = lambda factions: supervisors.rejoin_all(f"faction(s) {list(factions)} found deaf")
    return Services(
        config=config,
        store=store,
        factions=Factions(store, supervisors, config.limits),
        supervisors=supervisors,
        ingest=ingest,
        hub=hub,
        held=HeldRequests(config.limits.max_held_requests),
        limiter=RateLimiter(config.limits.client_rate, config.limits.client_burst),
        traffic=traffic,
        http=HttpCounters(max_connections(config, open_file_limit())),
        version=relay.__version__,
        started_at=trio.current_time(),
        wall_clock_ms=wall_clock_ms,
        deafness=deafness,
    )


async def _run_relay(
    config: Config, hub: Hub, *, task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED
) -> None:
    async with (
        open_configured_store(config) as store,
        httpx.AsyncClient() as rest_client,
    ):  # closed after the nursery below: no read outlives it
        services = build_services(config, store=store, rest_client=rest_client, hub=hub)
        async with trio.open_nursery() as nursery:
            await nursery.start(services.supervisors.run, store.active_factions(), name="supervisors")
            nursery.start_soon(hub.wake_quiet_factions_every, SSE_KEEPALIVE_S, name="keep-alive")
            run_pass = functools.partial(
                maintenance_pass,
                store,
                services.factions,
                subscription_ttl_s=config.retention.subscription_ttl_s,
            )
            await nursery.start(
                run_schedule, config.retention.maintenance_interval_s, run_pass, name="maintenance"
            )
            await nursery.start(run_schedule, COLLECT_EVERY_S, YoungGarbage().look, name="garbage")
            http_done = trio.Event()
            app = create_app(services)
            server_config = hypercorn_config(config)
            hot = HotPath(app.asgi_app, server_config) if config.server.hot_path else None
            if hot is not None:
                nursery.start_soon(hot.turns.watch_lag, name="turns")
            urls = await nursery.start(
                serve_http, app, server_config, hub, services.http.connections, http_done, hot, name="http"
            )
            log.info(
                "relay %s listening on %s with %d active factions",
                relay.__version__,
                urls[0],
                len(store.active_factions()),
            )
            task_status.started(RunningRelay(app, services, urls, hot))
            await http_done.wait()
            log.info("HTTP server drained; closing upstream sockets")
            nursery.cancel_scope.cancel()


async def serve_http(
    app: QuartTrio,
    config: HypercornConfig,
    hub: Hub,
    counters: ConnectionCounters,
    done: trio.Event,
    hot: HotPath | None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve(
            # The app's middleware stack without Quart's own __call__ on top: one frame less held
            # by each of thousands of held requests, and nothing lost (it only calls asgi_app).
            app.asgi_app,
            config,
            counters,
            shutdown_trigger=hub.stopping.wait,
            hot=hot,
            task_status=task_status,
        )
    finally:
        done.set()


async def watch_signals(hub: Hub, relay_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not hub.stopping.is_set():
                log.info("%s received: shutting down", signal.Signals(signum).name)
                hub.begin_stopping()
            else:
                log.warning("%s received again: stopping now", signal.Signals(signum).name)
                relay_scope.cancel()
