"""Upstream supervisors, and the registry that holds their nursery.

A supervisor keeps one upstream connection alive: it runs a connection, records how it ended, waits
a jittered backoff and tries again, forever, until it is stopped. There are two kinds, both built on
`UpstreamSupervisor`: a `FactionSupervisor` holds one faction's channels, with its reconciler
(`relay.upstream.reconcile`) beside the connection while it is live; the one `SharedDeleteSupervisor`,
started with the first faction, holds the relay-wide DELETE subscription of the tables whose
`deletes` is "shared" and hands every DELETE to the router (`relay.upstream.shared_deletes`, through
`relay.ingest`). The connection loop holds the relay's upstream `except Exception` (there is one more
in the reconciler's task, for the same reason): an explicit restart policy, so that whatever goes
wrong with one faction is logged, shown in `/status`, and retried, and never reaches another faction
or the HTTP server.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from relay.config import ChannelConfig
from relay.upstream.backoff import Backoff
from relay.upstream.connection import ConnectionHooks, ConnectionSettings, run_connection
from relay.upstream.pacing import Unread
from relay.upstream.phoenix import ChangeIgnored, ChangeReceived, ChannelSpec, UpstreamError
from relay.upstream.reconcile import Reconciler, ReconcileStatistics

log = logging.getLogger(__name__)

# A `postgres_changes` error the server never retries (the table is not in the publication, the filter
# names no column) is fixed by an operator, in minutes at best: trying every 10 minutes picks the fix
# up without a restart, and until then costs a faction six joins an hour rather than one a minute
# (the backoff's cap), which matters when every faction meets it at once.
MISCONFIGURED_RETRY_S = 600.0
# "Subscribed to PostgreSQL" can come before the project's replication slot exists (a cold project,
# or capture workers restarted): the server sends it once the subscription row is inserted, while the
# slot is created on the poller's own schedule and waits for running transactions, and changes
# committed in between are never sent (audit finding 2; realtime-js #525 reports 1-3 s). The reconcile
# at going live reads too early to see them; a second one this long after covers that window several
# times over, and costs one more read per connection, not per interval.
COLD_START_RECONCILE_S = 12.0

# Where a faction's changes go (`relay.ingest.Ingest.upstream`); it raises DeliveryFailed when it
# cannot take them.
FactionSink = Callable[[int, Sequence[ChangeReceived]], Awaitable[object]]
# Where the relay-wide DELETEs go, to be routed by key (`relay.ingest.Ingest.route_shared_deletes`).
SharedSink = Callable[[Sequence[ChangeReceived]], Awaitable[None]]
WallClockMs = Callable[[], int]


class DeliveryFailed(Exception):
    """The ingest sink could not take the changes (the store could not write them): a designed
    failure, logged in one line and retried like an upstream fault, with no traceback."""


class Rejoin(Exception):
    """The connection was ended on purpose, to join afresh (`UpstreamSupervisor.rejoin`)."""


class JoinPacer:
    """Spaces channel joins out across every faction: at most `joins_per_second`, in arrival order.

    Supabase disconnects the whole socket of a project that exceeds its joins per second (protocol
    reference 10), so a restart with 150 factions, or a region-wide blip that drops them all, must
    reach them one after another rather than in one burst. Each connection reserves its slots in a
    shared schedule and sleeps until its turn; a cancelled waiter simply leaves its slot unused.
    """

    def __init__(self, joins_per_second: float) -> None:
        self._interval_s = 1.0 / joins_per_second
        self._next_free = -math.inf

    async def wait_turn(self, joins: int) -> None:
        start = max(trio.current_time(), self._next_free)
        self._next_free = start + joins * self._interval_s
        await trio.sleep_until(start)


class UpstreamState(enum.StrEnum):
    CONNECTING = "connecting"  # opening, joining, or joined but not yet "Subscribed to PostgreSQL"
    CONNECTED = "connected"  # every channel live
    BACKOFF = "backoff"
    AUTH_FAILED = "auth_failed"  # the key was refused; retried at the capped delay
    MISCONFIGURED = "misconfigured"  # a subscription error the server never retries; retried slowly
    STOPPED = "stopped"  # expired for lack of polls; stays listed


@dataclass(frozen=True, slots=True)
class SupervisorSettings:
    connection: ConnectionSettings
    channels: Sequence[ChannelConfig]
    backoff_initial_s: float
    backoff_max_s: float
    joins_per_second: float = 20.0
    # How long a connection must stay live before its failures are forgiven and the delay starts
    # over: long enough that a socket dying right after "Subscribed" keeps backing off.
    healthy_after_s: float = 30.0

    def channel_specs(self, faction_id: int) -> list[ChannelSpec]:
        return [ChannelSpec(channel.table, channel.filter_for(faction_id)) for channel in self.channels]

    def shared_delete_specs(self) -> list[ChannelSpec]:
        """One unfiltered DELETE channel per table whose deletes are routed by key, on one socket."""
        return [ChannelSpec(c.table, "", event="DELETE") for c in self.channels if c.deletes == "shared"]


@dataclass(frozen=True, slots=True)
class UpstreamStatistics:
    state: UpstreamState
    attempts: int  # connection attempts since the upstream was last live
    last_error: str | None
    connected_since: int | None  # wall-clock ms
    next_attempt_in_s: float | None
    reconnects: int
    changes_received: int
    changes_ignored: int
    reconcile: ReconcileStatistics | None = None
    changes_dropped: int = 0  # the oldest changes of a flood the relay could not keep
    heartbeat_round_trip_s: float | None = None  # the latest heartbeat's, on this connection
    misconfigurations: int = 0  # connections ended by a subscription error the server never retries
    subscription_retries: int = 0  # `postgres_changes` errors the server retried on the same join
    resubscriptions: int = 0  # "Subscribed" again on a live connection (each asks for a reconcile)


class UpstreamSupervisor:
    """Keeps one upstream connection, of `specs`, alive until stopped; the base of both kinds.

    It keeps a nursery of its own for the tasks that live beside its connection (a faction's
    reconciler), so that stopping the supervisor stops them too. With the registry's, these are the
    only nurseries the relay keeps.
    """

    def __init__(
        self,
        name: str,
        settings: SupervisorSettings,
        specs: Sequence[ChannelSpec],
        *,
        pacer: JoinPacer,
        rng: random.Random,
        wall_clock_ms: WallClockMs,
    ) -> None:
        self._name = name
        self._specs = list(specs)
        self._nursery: trio.Nursery | None = None
        self._settings = settings
        self._pacer = pacer
        self._wall_clock_ms = wall_clock_ms
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng)
        self._scope = trio.CancelScope()
        self.stopped = trio.Event()
        self._started = False
        self._state = UpstreamState.CONNECTING
        self._attempts = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._live_since: float | None = None  # trio clock, for the healthy rule
        self._connected_since: int | None = None  # wall clock, for people
        self._next_attempt_at: float | None = None
        self._received = 0
        self._ignored = 0
        self._dropped = 0
        self._flood: _Flood | None = None  # from the first change dropped until the backlog is empty
        self._round_trip_s: float | None = None
        self._unread: Unread | None = None  # the open socket's unread byte count (FIONREAD)
        self._connection_scope: trio.CancelScope | None = None  # see `rejoin`
        self._rejoin_reason: str | None = None
        self._misconfigurations = 0
        self._subscription_retries = 0
        self._resubscriptions = 0

    def __repr__(self) -> str:
        return self._name

    def rejoin(self, reason: str) -> bool:
        """End the connection and join afresh (after the usual, paced, backoff): channels that are
        joined but deaf hear again only through a new join (relay.upstream.deafness). False when
        there is no connection to end."""
        if self._connection_scope is None or self.stopping:
            return False
        self._rejoin_reason = reason
        self._connection_scope.cancel()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started = True
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    while True:
                        error = await self._run_one_connection()
                        self._connection_ended()
                        await self._wait_after(error)
        finally:
            self._set_state(UpstreamState.STOPPED)
            self._next_attempt_at = None
            self.stopped.set()

    def stop(self) -> None:
        self._scope.cancel()
        if not self._started:  # asked for before the registry ran, and never run: nothing to close
            self._set_state(UpstreamState.STOPPED)
            self.stopped.set()

    @property
    def stopping(self) -> bool:
        """Asked to stop (it may still be closing its socket) or already stopped."""
        return self._scope.cancel_called or self.stopped.is_set()

    async def _deliver(self, changes: Sequence[ChangeReceived]) -> None:
        """Hand the changes on; raises DeliveryFailed when they could not be taken."""
        raise NotImplementedError  # each kind says where its changes go

    def _connection_live(self) -> None:
        """Every channel is live: what a kind starts beside the connection starts here."""

    def _connection_ended(self) -> None:
        """The connection ended: what `_connection_live` started stops here."""

    def _on_read(self, change: ChangeReceived) -> None:
        """A change was read from the socket (it may wait in the backlog before it is delivered)."""

    def _changes_lost(self) -> None:
        """Changes were dropped before they could be delivered: what a kind does about it."""

    def _flood_over(self) -> None:
        """The backlog is empty again after changes were dropped: what a kind repairs."""

    def missed(self, reason: str, *, check_first: bool = False) -> None:
        """Upstream may have committed changes it never sent (`reason`): what a kind repairs. With
        `check_first`, a cheap probe decides whether a whole read is needed (`Reconciler.request`)."""

    async def _run_one_connection(self) -> BaseException:
        self._attempts += 1
        self._set_state(UpstreamState.CONNECTING)
        hooks = ConnectionHooks(
            deliver=self._count_and_deliver,
            on_live=self._on_live,
            on_ignored=self._on_ignored,
            on_read=self._on_read,
            on_dropped=self._on_dropped,
            on_caught_up=self._on_caught_up,
            on_heartbeat=self._on_heartbeat,
            on_retrying=self._on_retrying,
            on_resubscribed=self._on_resubscribed,
            on_open=self._on_open,
        )
        specs = self._specs
        await self._pacer.wait_turn(len(specs))
        try:
            with trio.CancelScope() as self._connection_scope:
                await run_connection(self._settings.connection, specs, hooks)
            return Rejoin(self._rejoin_reason or "asked to rejoin")
        except (UpstreamError, DeliveryFailed) as exc:
            return exc
        except Exception as exc:  # the restart policy: a bug or a store fault must not kill the faction
            log.exception("%r: connection failed unexpectedly", self)
            return exc
        finally:
            self._connection_scope = None
            self._rejoin_reason = None
            self._unread = None
            self._end_flood()  # cut short by the connection's end: the reconcile after the next join repairs it

    async def _wait_after(self, error: BaseException) -> None:
        live_for = None if self._live_since is None else trio.current_time() - self._live_since
        if live_for is not None and live_for >= self._settings.healthy_after_s:
            self._backoff.reset()
        self._live_since = None
        self._connected_since = None
        self._round_trip_s = None
        self._reconnects += 1
        self._last_error = f"{type(error).__name__}: {error}"
        auth = isinstance(error, UpstreamError) and error.auth
        misconfigured = isinstance(error, UpstreamError) and error.misconfigured
        if misconfigured:
            self._misconfigurations += 1
            delay = MISCONFIGURED_RETRY_S
            state = UpstreamState.MISCONFIGURED
            # Upstream's configuration, not a bug here: one WARNING with the server's own words.
            log.warning("%r: Supabase refuses the subscription: %s; retry in %.0f s", self, error, delay)
        else:
            delay = self._backoff.capped_delay() if auth else self._backoff.next_delay()
            state = UpstreamState.AUTH_FAILED if auth else UpstreamState.BACKOFF
        retry_after = error.retry_after_s if isinstance(error, UpstreamError) else None
        delay = max(delay, retry_after or 0.0)
        self._set_state(state, f"{self._last_error}; retry in {delay:.1f} s")
        self._next_attempt_at = trio.current_time() + delay
        await trio.sleep_until(self._next_attempt_at)
        self._next_attempt_at = None

    async def _count_and_deliver(self, changes: Sequence[ChangeReceived]) -> None:
        await self._deliver(changes)
        self._received += len(changes)

    def _on_live(self) -> None:
        self._attempts = 0
        self._live_since = trio.current_time()
        self._connected_since = self._wall_clock_ms()
        self._set_state(UpstreamState.CONNECTED)
        self._connection_live()

    def live_for(self) -> float:
        """Seconds the current connection has been live; 0 when it is not."""
        return 0.0 if self._live_since is None else trio.current_time() - self._live_since

    def _on_open(self, unread: Unread) -> None:
        self._unread = unread

    def unread_bytes(self) -> int:
        """Bytes the kernel holds received on the open socket and not yet read: a reader behind."""
        return self._unread() if self._unread is not None else 0

    def _on_heartbeat(self, round_trip_s: float) -> None:
        self._round_trip_s = round_trip_s

    def _on_retrying(self, table: str, message: str) -> None:
        """The server retries this subscription on the same join: the socket is kept (the connection
        bounds the wait), and the faction is not live meanwhile."""
        self._subscription_retries += 1
        self._last_error = f"{table}: {message} (the server retries on the same join)"
        log.warning("%r: %s", self, self._last_error)
        self._set_state(UpstreamState.CONNECTING)

    def _on_resubscribed(self, table: str, live: bool) -> None:
        self._resubscriptions += 1
        if live:  # every channel: another may still wait for the server's retry
            self._set_state(UpstreamState.CONNECTED, f"{table} subscribed again")
        self.missed(f'"Subscribed to PostgreSQL" again on {table}')

    def _on_dropped(self, count: int) -> None:
        """One WARNING per flood, not one per change; the summary comes when it is over."""
        self._dropped += count
        if self._flood is None:
            self._flood = _Flood(trio.current_time())
            log.warning(
                "%r: upstream flood: more changes than the backlog holds (%d changes, %d bytes);"
                " dropping the oldest",
                self,
                self._settings.connection.max_buffered_changes,
                self._settings.connection.max_buffered_bytes,
            )
        self._flood.dropped += count
        self._changes_lost()

    def _on_caught_up(self) -> None:
        if self._end_flood():
            self._flood_over()

    def _end_flood(self) -> bool:
        """The summary of the flood, if there was one."""
        flood, self._flood = self._flood, None
        if flood is None:
            return False
        log.info(
            "%r: upstream flood over: %d change(s) dropped in %.1f s",
            self,
            flood.dropped,
            trio.current_time() - flood.started_at,
        )
        return True

    def _on_ignored(self, ignored: ChangeIgnored) -> None:
        self._ignored += 1
        log.debug("%r: ignored a %s change: %s", self, ignored.table, ignored.reason)

    def _set_state(self, state: UpstreamState, detail: str | None = None) -> None:
        if state != self._state or detail:
            log.info("%r: %s -> %s%s", self, self._state, state, f" ({detail})" if detail else "")
        self._state = state

    def statistics(self) -> UpstreamStatistics:
        next_in = (
            None if self._next_attempt_at is None else max(0.0, self._next_attempt_at - trio.current_time())
        )
        return UpstreamStatistics(
            state=self._state,
            attempts=self._attempts,
            last_error=self._last_error,
            connected_since=self._connected_since,
            next_attempt_in_s=next_in,
            reconnects=self._reconnects,
            changes_received=self._received,
            changes_ignored=self._ignored,
            changes_dropped=self._dropped,
            heartbeat_round_trip_s=self._round_trip_s,
            misconfigurations=self._misconfigurations,
            subscription_retries=self._subscription_retries,
            resubscriptions=self._resubscriptions,
        )


@dataclass(slots=True)
class _Flood:
    started_at: float  # trio clock
    dropped: int = 0


class FactionSupervisor(UpstreamSupervisor):
    """One faction's channels, and its reconciler beside the connection while it is live."""

    def __init__(
        self,
        faction_id: int,
        settings: SupervisorSettings,
        sink: FactionSink,
        *,
        pacer: JoinPacer,
        rng: random.Random,
        wall_clock_ms: WallClockMs,
        reconciler: Reconciler | None = None,
        on_lost: Callable[[int], None] | None = None,
        capture_warm: Callable[[UpstreamSupervisor], bool] | None = None,
    ) -> None:
        super().__init__(
            f"FactionSupervisor({faction_id})",
            settings,
            settings.channel_specs(faction_id),
            pacer=pacer,
            rng=rng,
            wall_clock_ms=wall_clock_ms,
        )
        self.faction_id = faction_id
        self._sink = sink
        self._reconciler = reconciler
        if reconciler is not None:
            reconciler.unread_upstream = self.unread_bytes
        self._reconciling: trio.CancelScope | None = None
        self._on_lost = on_lost
        self._capture_warm = capture_warm

    async def _deliver(self, changes: Sequence[ChangeReceived]) -> None:
        await self._sink(self.faction_id, changes)

    def _connection_live(self, cold_start: bool = True) -> None:
        # A join onto capture that has run for a while is not in a cold start's window: one full
        # read (the one at going live) heals a gap, not two.
        if cold_start and self._capture_warm is not None and self._capture_warm(self):
            cold_start = False
        if self._reconciler is not None and self._nursery is not None:
            self._reconciling = trio.CancelScope()
            self._nursery.start_soon(
                self._reconcile_while_live, self._reconciling, self._reconciler, cold_start
            )

    def _connection_ended(self) -> None:
        if self._reconciling is not None:
            self._reconciling.cancel()
            self._reconciling = None

    def _on_read(self, change: ChangeReceived) -> None:
        # As soon as it is read, not when it is stored: a snapshot read that ends while the change
        # waits in the backlog must still leave its key alone (relay.upstream.reconcile).
        if self._reconciler is not None:
            self._reconciler.note_live_change(change.table, change.data)

    def _changes_lost(self) -> None:
        if self._reconciler is not None:  # a known loss, not deafness (relay.upstream.deafness)
            self._reconciler.note_lost()
        if self._on_lost is not None:  # members are told `truncated` (relay.ingest.Ingest.changes_lost)
            self._on_lost(self.faction_id)

    def _flood_over(self) -> None:
        """The stored rows lack what was dropped: reconcile now rather than at the next interval
        (the reconciler starts with a reconcile; one in flight is cut, its snapshot predates the end)."""
        if self._reconciling is not None:
            self._connection_ended()
            self._connection_live(cold_start=False)

    def missed(self, reason: str, *, check_first: bool = False) -> None:
        if self._reconciler is not None:
            self._reconciler.request(reason, check_first=check_first)

    async def _reconcile_while_live(
        self, scope: trio.CancelScope, reconciler: Reconciler, cold_start: bool
    ) -> None:
        with scope:
            try:
                async with trio.open_nursery() as nursery:
                    if cold_start:
                        nursery.start_soon(self._after_cold_start, reconciler)
                    await reconciler.run_while_live()
            except Exception:  # the restart policy: a bug here must not take the connection down
                log.exception(
                    "%r: reconciling failed unexpectedly; next try when the connection is back", self
                )

    @staticmethod
    async def _after_cold_start(reconciler: Reconciler) -> None:
        await trio.sleep(COLD_START_RECONCILE_S)
        # What a cold start loses is an INSERT or DELETE as often as not: a probe finds it, and the
        # whole read follows only then (an UPDATE in the window is healed by the next reconcile).
        reconciler.request(
            f"{COLD_START_RECONCILE_S:g} s after going live (a cold start's window)", check_first=True
        )

    def statistics(self) -> UpstreamStatistics:
        reconcile = self._reconciler.statistics() if self._reconciler is not None else None
        return dataclasses.replace(super().statistics(), reconcile=reconcile)


class SharedDeleteSupervisor(UpstreamSupervisor):
    """The relay-wide DELETE channels, on one socket; every DELETE goes to `route`."""

    def __init__(
        self,
        settings: SupervisorSettings,
        route: SharedSink,
        *,
        pacer: JoinPacer,
        rng: random.Random,
        wall_clock_ms: WallClockMs,
        on_missed: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._on_missed = on_missed
        super().__init__(
            "SharedDeletes",
            settings,
            settings.shared_delete_specs(),
            pacer=pacer,
            rng=rng,
            wall_clock_ms=wall_clock_ms,
        )
        self._route = route

    async def _deliver(self, changes: Sequence[ChangeReceived]) -> None:
        await self._route(changes)

    def missed(self, reason: str, *, check_first: bool = False) -> None:
        """DELETEs of any faction may be gone: each faction's reconcile finds its own."""
        if self._on_missed is not None:
            self._on_missed(f"relay-wide DELETE channels: {reason}", check_first)

    def _connection_live(self) -> None:
        # Realtime never replays: a DELETE made while this socket was not live is gone, and under
        # DEFAULT identity no faction's channel carried it either. A faction not live yet loses
        # nothing by the reconcile: its own on going live covers the gap. A DELETE missed lowers the
        # faction's row count, so a probe tells which factions need the whole read.
        self.missed("live: DELETEs made while it was not are missed", check_first=True)


class Supervisors:
    """The registry: one supervisor per subscribed faction, all in one nursery this object owns.

    The only place in the relay that starts upstream tasks: request handlers ask for a faction to be
    running, and its supervisor task is started here, in the relay's task tree. A faction asked for
    before `run` is started when it runs (the HTTP-contract tests never run it: no socket is opened).
    """

    def __init__(
        self,
        settings: SupervisorSettings,
        sink: FactionSink,
        *,
        rng: random.Random | None = None,
        wall_clock_ms: WallClockMs,
        reconciler_for: Callable[[int], Reconciler] | None = None,
        route_shared_deletes: SharedSink | None = None,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._on_lost = on_lost
        self._reconciler_for = reconciler_for
        self._route_shared_deletes = route_shared_deletes
        self._shared: SharedDeleteSupervisor | None = None
        self._rng = rng or random.Random()
        self._wall_clock_ms = wall_clock_ms
        self._nursery: trio.Nursery | None = None
        self._supervisors: dict[int, FactionSupervisor] = {}
        self._waiting: list[FactionSupervisor] = []  # asked for before `run`
        self._pacer = JoinPacer(settings.joins_per_second)

    async def run(
        self,
        initial_factions: Sequence[int] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for faction_id in initial_factions:
                self.ensure_running(faction_id)
            waiting, self._waiting = self._waiting, []
            for supervisor in waiting:
                self._start(supervisor)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def ensure_running(self, faction_id: int) -> None:
        """Start the faction's supervisor unless one is running; a running one keeps its socket."""
        current = self._supervisors.get(faction_id)
        # One being stopped does not count: a poll can revive a faction while maintenance is still
        # closing its old socket, and the old supervisor will not come back by itself.
        if current is not None and not current.stopping:
            return
        supervisor = FactionSupervisor(
            faction_id,
            self._settings,
            self._sink,
            pacer=self._pacer,
            rng=self._rng,
            wall_clock_ms=self._wall_clock_ms,
            reconciler=self._reconciler_for(faction_id) if self._reconciler_for is not None else None,
            on_lost=self._on_lost,
            capture_warm=self._capture_warm,
        )
        self._supervisors[faction_id] = supervisor
        self._start(supervisor)

    def _start(self, supervisor: FactionSupervisor) -> None:
        if self._nursery is None:
            self._waiting.append(supervisor)
            return
        self._nursery.start_soon(supervisor.run, name=repr(supervisor))
        self._ensure_shared_deletes()

    def _ensure_shared_deletes(self) -> None:
        if (
            self._shared is not None
            or self._route_shared_deletes is None
            or not self._settings.shared_delete_specs()
            or self._nursery is None
        ):
            return
        self._shared = SharedDeleteSupervisor(
            self._settings,
            self._route_shared_deletes,
            pacer=self._pacer,
            rng=self._rng,
            wall_clock_ms=self._wall_clock_ms,
            on_missed=self._every_faction_missed,
        )
        self._nursery.start_soon(self._shared.run, name=repr(self._shared))

    def _every_faction_missed(self, reason: str, check_first: bool) -> None:
        for supervisor in self._supervisors.values():
            if not supervisor.stopping:
                supervisor.missed(reason, check_first=check_first)

    async def stop(self, faction_id: int) -> None:
        supervisor = self._supervisors.get(faction_id)
        if supervisor is not None:
            supervisor.stop()
            await supervisor.stopped.wait()
        shared = self._shared
        if shared is not None and all(sup.stopping for sup in self._supervisors.values()):
            # The last faction went idle: an idle relay holds no upstream socket at all.
            self._shared = None
            shared.stop()
            await shared.stopped.wait()

    def _capture_warm(self, asking: UpstreamSupervisor) -> bool:
        """Whether the project's change capture has been running for a cold start's window: another
        of the relay's connections has been live that long (a join then lands on running capture,
        and "Subscribed" is not early). Deaf capture looks warm too; the probes find that."""
        others: list[UpstreamSupervisor] = [*self._supervisors.values()]
        if self._shared is not None:
            others.append(self._shared)
        return any(other is not asking and other.live_for() >= COLD_START_RECONCILE_S for other in others)

    def rejoin_all(self, reason: str) -> int:
        """Every running faction, and the shared DELETE socket, joins afresh (paced); how many
        factions were asked."""
        asked = sum(sup.rejoin(reason) for sup in self._supervisors.values())
        if self._shared is not None:
            self._shared.rejoin(reason)
        return asked

    def statistics(self) -> dict[int, UpstreamStatistics]:
        return {faction_id: sup.statistics() for faction_id, sup in self._supervisors.items()}

    def shared_deletes_statistics(self) -> UpstreamStatistics | None:
        """The relay-wide DELETE subscription, once the first faction started it."""
        return self._shared.statistics() if self._shared is not None else None
