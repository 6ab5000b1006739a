"""The composition root: the relay's one top-level nursery, its start order and its shutdown order.

    trio.run(run_relay)
    ├── watch_signals → hub.begin_stopping              # SIGINT/SIGTERM; a second one cuts short,
    │                                                   # also while sockets and the store close
    └── async with open_store(...), httpx client       # closed last: committer drained, checkpoint
        └── nursery "relay"
            ├── Supervisors.run (its own nursery)
            │   ├── faction 46666 (own CancelScope) ── upstream connection (reader + heartbeat)
            │   │                                   └── reconciler (REST reads), while live
            │   └── SharedDeletes ── the relay-wide DELETE channels, routed by key
            ├── run_schedule(maintenance_pass)
            ├── hub.wake_quiet_factions_every         # SSE keep-alives: one timer for all streams
            └── http_server.serve(app)                # hypercorn's HTTP/1.1 protocol on the relay's sockets

Shutdown: `stopping` is set, so held requests return at once; the HTTP server stops accepting,
closes idle connections, answers what is in flight and cuts whatever is still open after
GRACEFUL_TIMEOUT_S (writes are never shielded, so a client that stopped reading cannot hold it);
then the supervisors and the schedule are cancelled (each upstream socket closes politely within a bounded, shielded
wait); last, the store checkpoints and closes.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from quart_trio import QuartTrio

import relay
from relay.admission import Services
from relay.answers import Answers
from relay.api import create_app
from relay.backoff import Backoff
from relay.config import Config
from relay.delivery import SSE_KEEPALIVE_S, HeldRequests
from relay.descriptors import max_connections, open_file_limit
from relay.events_http import EVENTS_HEADERS
from relay.http_server import serve
from relay.http_stats import ConnectionCounters, HttpCounters
from relay.hub import Hub
from relay.maintenance import maintenance_pass, run_schedule
from relay.phoenix import ChangeReceived, split_conditions
from relay.ratelimit import RateLimiter
from relay.reconcile import Reconciler
from relay.shared_deletes import DeleteRouter
from relay.snapshot import RestSettings, Snapshot, read_rows
from relay.store import Store, StoreError, open_store, wall_clock_ms
from relay.supervisor import DeliveryFailed, Supervisors, SupervisorSettings
from relay.traffic import Source, Traffic
from relay.upstream import ConnectionSettings

log = logging.getLogger(__name__)

# Long enough for any answer in flight (milliseconds; held requests return at `stopping`). Hypercorn
# 0.18 also keeps idle keep-alive connections open until this deadline, so it is what a clean
# shutdown costs whenever a browser is connected: keep it short.
GRACEFUL_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 5.0
MAX_HEAD_BYTES = 16 * 1024
# Connections the kernel queues before hypercorn accepts them (Linux caps it at net.core.somaxconn,
# 4096 by default). hypercorn's default of 100 overflowed under `make bench`'s 15,000 SSE clients
# connecting at once, which is what every member's browser does after a restart.
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class RunningRelay:
    """What a started relay hands its starter: where it listens and how to stop it."""

    urls: Sequence[str]
    app: QuartTrio
    services: Services

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def supervisors(self) -> Supervisors:
        return self.services.supervisors

    @property
    def hub(self) -> Hub:
        return self.services.hub

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


def hypercorn_config(config: Config) -> HypercornConfig:
    server = HypercornConfig()
    host = config.server.host
    server.bind = [f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"]
    server.graceful_timeout = GRACEFUL_TIMEOUT_S
    server.backlog = LISTEN_BACKLOG
    # Set deliberately rather than inherited: an idle connection is closed after KEEP_ALIVE_S, and
    # hypercorn counts a connection idle until a whole request head has arrived, so this also cuts a
    # head trickled byte by byte (slowloris) and a socket that never sends one. Heads are capped at
    # MAX_HEAD_BYTES. There is no read timeout: a held long-poll or an SSE stream legitimately sends
    # nothing for minutes.
    server.keep_alive_timeout = KEEP_ALIVE_S
    server.h11_max_incomplete_size = MAX_HEAD_BYTES
    server.read_timeout = None
    server.accesslog = None
    # A Logger (not a path) makes hypercorn log through the relay's logging set-up, once.
    server.errorlog = logging.getLogger("hypercorn.error")
    return server


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


async def _run_relay(
    config: Config, hub: Hub, *, task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED
) -> None:
    started_at = trio.current_time()
    async with (
        open_store(
            config.storage.path,
            events_per_faction=config.retention.events_per_faction,
            now_ms=wall_clock_ms,
            key_columns=config.upstream.key_columns,
        ) as store,
        httpx.AsyncClient() as rest_client,
    ):  # closed after the nursery below: no read outlives it
        traffic = Traffic()

        async def ingest(faction_id: int, changes: Sequence[ChangeReceived]) -> None:
            traffic.upstream_changed(faction_id, trio.current_time())
            try:
                stored = await store.append_events(
                    faction_id, [("postgres_changes", change.data) for change in changes]
                )
            except StoreError as exc:
                # The connection ends and is retried with backoff; these changes were never served.
                raise DeliveryFailed(f"{len(changes)} change(s) not stored: {exc}") from exc
            hub.notify(faction_id)
            traffic.stored(faction_id, Source.UPSTREAM, len(stored), trio.current_time())
            await router.stored(faction_id, changes)

        async def deliver_routed(faction_id: int, changes: Sequence[ChangeReceived]) -> None:
            for change in changes:
                supervisors.note_live_change(faction_id, change)
            await ingest(faction_id, changes)

        router = DeleteRouter(
            config.upstream.key_columns,
            store.row_owner,
            deliver_routed,
            filter_columns={
                channel.table: frozenset(
                    condition.partition("=")[0].strip() for condition in split_conditions(channel.filter)
                )
                for channel in config.upstream.channels
            },
        )

        async def route_shared_deletes(_: int, changes: Sequence[ChangeReceived]) -> None:
            await router.route(changes)

        rest = RestSettings(
            config.upstream.rest_base, config.upstream.anon_key, config.upstream.connect_timeout_s
        )

        async def read_snapshot(table: str, filter_text: str, key: str) -> Snapshot:
            return await read_rows(rest_client, rest, table, filter_text, key)

        async def apply_snapshot(
            faction_id: int, table: str, rows: list[dict[str, Any]], skip: frozenset[Any], read_at: str
        ) -> int:
            events = await store.reconcile(faction_id, table, rows, skip=skip, commit_timestamp=read_at)
            if events:
                hub.notify(faction_id)
                traffic.stored(faction_id, Source.RECONCILE, len(events), trio.current_time())
            return len(events)

        def reconciler_for(faction_id: int) -> Reconciler:
            return Reconciler(
                faction_id,
                config.upstream.channels,
                read_snapshot,
                apply_snapshot,
                interval_s=config.upstream.reconcile_interval_s,
                backoff=Backoff(config.upstream.backoff_initial_s, config.upstream.backoff_max_s),
                wall_clock_ms=wall_clock_ms,
            )

        supervisors = Supervisors(
            supervisor_settings(config),
            ingest,
            wall_clock_ms=wall_clock_ms,
            reconciler_for=reconciler_for,
            route_shared_deletes=route_shared_deletes,
        )
        held = HeldRequests(config.limits.max_held_requests)
        limiter = RateLimiter(config.limits.client_rate, config.limits.client_burst)
        services = Services(
            config,
            store,
            supervisors,
            hub,
            held,
            limiter,
            Answers(EVENTS_HEADERS),
            traffic,
            HttpCounters(max_connections(config, open_file_limit())),
            relay.__version__,
            started_at,
            wall_clock_ms,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisors.run, store.active_factions(), name="supervisors")
            nursery.start_soon(hub.wake_quiet_factions_every, SSE_KEEPALIVE_S, name="keep-alive")
            run_pass = functools.partial(
                maintenance_pass, store, supervisors, subscription_ttl_s=config.retention.subscription_ttl_s
            )
            await nursery.start(
                run_schedule, config.retention.maintenance_interval_s, run_pass, name="maintenance"
            )
            http_done = trio.Event()
            app = create_app(services)
            urls = await nursery.start(
                serve_http, app, config, hub, services.http.connections, http_done, name="http"
            )
            log.info(
                "relay %s listening on %s with %d active factions",
                relay.__version__,
                urls[0],
                len(store.active_factions()),
            )
            task_status.started(RunningRelay(urls, app, services))
            await http_done.wait()
            log.info("HTTP server drained; closing upstream sockets")
            nursery.cancel_scope.cancel()


async def serve_http(
    app: QuartTrio,
    config: Config,
    hub: Hub,
    counters: ConnectionCounters,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve(
            # The app's middleware stack without Quart's own __call__ on top: one frame less held
            # by each of thousands of held requests, and nothing lost (it only calls asgi_app).
            app.asgi_app,
            hypercorn_config(config),
            counters,
            shutdown_trigger=hub.stopping.wait,
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
