"""Reconciling a faction's stored rows with upstream's, so members never act on a stale call list.

Supabase Realtime never replays: a change made while the faction's socket was down, reconnecting or
dropped under load is gone. So once all of a faction's channels are live, and every
`reconcile_interval_s` while they stay live, each table is read through REST (`relay.upstream.snapshot`) and
the store turns the differences into ordinary `postgres_changes` events marked `resync`.

The race: a change can reach the socket while a snapshot is being read. Such a change is at least as
new as the snapshot (it either committed after the read, and the snapshot lacks it, or before, and
both agree), so the keys it touched are left out of the comparison. Their keys are noted when the
change is delivered, before it is stored, so a change still waiting for its commit is covered too.

A REST failure is retried with its own backoff and shown in `/status`; it never holds up live events,
which flow on the same socket meanwhile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import trio

from relay.config import ChannelConfig
from relay.storage.planning import UnstorableData
from relay.storage.store import StoreError
from relay.upstream.backoff import Backoff
from relay.upstream.deafness import DeafWatch
from relay.upstream.snapshot import Snapshot, SnapshotError

log = logging.getLogger(__name__)

# Snapshots read and compared at once, relay-wide. A snapshot is a faction's whole table in memory
# (rows reach a megabyte each), and after a restart every faction reconciles at once: bounded, the
# memory is a few tables' worth however many factions there are. The store compares one at a time
# anyway; reading the next while one is compared keeps REST and the store both busy.
SNAPSHOTS_AT_ONCE = 2

# (table, filter, key column) -> the rows upstream holds now.
ReadSnapshot = Callable[[str, str, str], Awaitable[Snapshot]]
# (faction, table, rows, keys to leave alone (a set that grows until the call returns),
# commit_timestamp) -> how many differences were stored.
ApplySnapshot = Callable[[int, str, list[dict[str, Any]], AbstractSet[Any], str], Awaitable[int]]


class ReconcileSink(Protocol):
    """Where differences are stored (`relay.ingest.Ingest`), and who tells a reconciler of live changes."""

    async def reconciled(
        self, faction_id: int, table: str, rows: list[dict[str, Any]], skip: AbstractSet[Any], read_at: str
    ) -> int: ...

    def watch_live_changes(self, faction_id: int, watcher: Reconciler) -> None: ...


def commit_timestamp(wall_clock_ms: int) -> str:
    """Realtime's own format (protocol reference 6.1): UTC, milliseconds, `Z`."""
    moment = datetime.fromtimestamp(wall_clock_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{wall_clock_ms % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class ReconcileStatistics:
    reconciles: int  # completed
    last_at: int | None  # wall-clock ms when the last one completed
    last_differences: int | None  # events it stored
    last_error: str | None  # of the latest attempt; None once one succeeds
    rest_requests: int  # upstream REST requests, all attempts
    requested: int = 0  # reconciles asked for before their time (`Reconciler.request`)
    rest_bytes: int = 0  # response bodies the reconciles read
    due: bool = False  # one is running or asked for


class Reconciler:
    def __init__(
        self,
        faction_id: int,
        channels: Sequence[ChannelConfig],
        read: ReadSnapshot,
        apply: ApplySnapshot,
        *,
        interval_s: float,
        backoff: Backoff,
        wall_clock_ms: Callable[[], int],
        snapshots: trio.CapacityLimiter | None = None,
        watch: DeafWatch | None = None,
    ) -> None:
        self.faction_id = faction_id
        self._snapshots = snapshots or trio.CapacityLimiter(SNAPSHOTS_AT_ONCE)
        self._channels = list(channels)
        self._keys = {channel.table: channel.key for channel in channels}
        self._read = read
        self._apply = apply
        self._interval_s = interval_s
        self._backoff = backoff
        self._wall_clock_ms = wall_clock_ms
        # (table, keys changed live, those changes in order) per read in flight
        self._reading: list[tuple[str, set[Any], list[tuple[str, Any]]]] = []
        # The keys the relay has heard of, per table: the last snapshot's, then every live change
        # since. None until the first reconcile of a live period; what a deafness probe compares.
        self._heard_keys: dict[str, set[Any]] | None = None
        self.heard = 0  # live changes noted; a faction whose count stands still is silent
        self.loss_pending = False  # changes dropped since the last reconcile began (`note_lost`)
        # Bytes the faction's socket holds unread, set by its supervisor: a socket behind is not deaf.
        self.unread_upstream: Callable[[], int] = _nothing_unread
        self._reconciles = 0
        self._last_at: int | None = None
        self._last_differences: int | None = None
        self._last_error: str | None = None
        self._rest_requests = 0
        self._requested = trio.Event()
        self._requests = 0
        self._rest_bytes = 0
        self._running = False
        self._must_reconcile = False  # a request that a probe cannot settle (`request`)
        self._watch = watch

    def __repr__(self) -> str:
        return f"Reconciler({self.faction_id})"

    def note_live_change(self, table: str, change: dict[str, Any]) -> None:
        """A change on the socket: any read of its table in flight must leave its keys alone, and the
        keys heard of follow it."""
        self.heard += 1
        key = self._keys.get(table)
        if key is None:
            return
        steps = _key_steps(change, key)
        if self._heard_keys is not None:
            _follow(self._heard_keys.setdefault(table, set()), steps)
        touched = [value for _, value in steps]
        for reading_table, keys, log in self._reading:
            if reading_table == table:
                keys.update(touched)
                log.extend(steps)

    def heard_of(self, table: str) -> tuple[int, Any] | None:
        """(rows, greatest key) of the table as the relay has heard it; None before the first
        reconcile of this live period, or when its keys do not compare."""
        keys = None if self._heard_keys is None else self._heard_keys.get(table)
        if keys is None:  # not read yet in this live period (a reconcile reads table after table)
            return None
        try:
            return len(keys), max(keys) if keys else None
        except TypeError:
            return None

    def note_lost(self) -> None:
        """Changes were dropped before they were stored (a flood): a probe that finds this faction's
        rows different asks for a reconcile rather than taking it for deaf."""
        self.loss_pending = True

    @property
    def tables(self) -> list[str]:
        return [channel.table for channel in self._channels]

    def key_of(self, table: str) -> str:
        return self._keys[table]

    def request(self, reason: str, *, check_first: bool = False) -> None:
        """Reconcile as soon as the one in progress, if any, has ended, rather than at the next interval:
        something upstream said may have been missed (a second "Subscribed", a change that could not
        be applied). Requests made meanwhile are one reconcile.

        `check_first`: only maybe missed, and an INSERT or DELETE if anything (a cold start's window,
        the shared DELETE socket's gap); while deafness probes run, one probe of the faction's tables
        decides, and the whole read follows only if upstream differs from what was heard."""
        if not self._requested.is_set():
            log.info("%r: %s asked for: %s", self, "check" if check_first else "reconcile", reason)
        self._requests += 1
        if not check_first or self._watch is None:
            self._must_reconcile = True
        self._requested.set()

    async def run_while_live(self) -> None:
        """Reconcile now, then when asked (`request`) or, without a deafness watch, every interval;
        until cancelled (the connection ended)."""
        self._backoff.reset()
        self._heard_keys = None  # a new live period: what was heard before may have been missed
        async with trio.open_nursery() as nursery:
            if self._watch is not None:
                nursery.start_soon(self._watch.take_part, self)
            await self._reconcile_when_due()

    async def _reconcile_when_due(self) -> None:
        interval_s = math.inf if self._watch is not None else self._interval_s
        must = True  # at going live
        while True:
            # A request made while this reconcile reads may concern a change after its read: it asks
            # for the next one.
            self._requested = trio.Event()
            self._must_reconcile = False
            self._running = True
            try:
                if not must and self._watch is not None:  # only checks were asked for
                    must = await self._watch.differs_for(self)
                if must:
                    await self._reconcile_until_done()
            finally:
                self._running = False
            self._backoff.reset()
            with trio.move_on_after(interval_s) as waited:
                await self._requested.wait()
            must = waited.cancelled_caught or self._must_reconcile

    async def _reconcile_until_done(self) -> None:
        while True:
            try:
                await self.reconcile_once()
                return
            except (SnapshotError, StoreError, UnstorableData) as exc:
                delay = self._backoff.next_delay()
                self._last_error = str(exc)
                log.warning("%r: reconcile failed (%s); retry in %.1f s", self, exc, delay)
                await trio.sleep(delay)

    async def reconcile_once(self) -> int:
        """Read every table, store the differences; returns how many there were."""
        self.loss_pending = False  # a loss during the reads sets it again
        differences = 0
        for channel in self._channels:
            async with self._snapshots:
                differences += await self._reconcile_table(channel)
        self._reconciles += 1
        self._last_at = self._wall_clock_ms()
        self._last_differences = differences
        self._last_error = None
        if differences:
            log.info("%r: %d difference(s) to upstream stored as resync events", self, differences)
        return differences

    async def _reconcile_table(self, channel: ChannelConfig) -> int:
        live_keys: set[Any] = set()
        live_log: list[tuple[str, Any]] = []
        entry = (channel.table, live_keys, live_log)
        self._reading.append(entry)
        read_at = self._wall_clock_ms()
        # Noted until the differences are stored, not only while the read is in flight: a change that
        # committed after the read reaches the socket when it does, possibly after the read returned
        # and before the store works out the differences (it reads `live_keys` then).
        try:
            try:
                snapshot = await self._read(channel.table, channel.filter_for(self.faction_id), channel.key)
            except SnapshotError as exc:
                self._rest_requests += exc.requests  # what the operator's quota pays for, failed or not
                raise
            self._rest_requests += snapshot.requests
            self._rest_bytes += snapshot.bytes
            heard = {row[channel.key] for row in snapshot.rows if channel.key in row}
            _follow(heard, live_log)  # what came live during the read is at least as new as the read
            if self._heard_keys is None:
                self._heard_keys = {}
            self._heard_keys[channel.table] = heard  # from here on, live changes update it directly
            return await self._apply(
                self.faction_id, channel.table, snapshot.rows, live_keys, commit_timestamp(read_at)
            )
        finally:
            self._reading.remove(entry)

    def statistics(self) -> ReconcileStatistics:
        return ReconcileStatistics(
            self._reconciles,
            self._last_at,
            self._last_differences,
            self._last_error,
            self._rest_requests,
            self._requests,
            self._rest_bytes,
            self._running or self._requested.is_set(),
        )


def _nothing_unread() -> int:
    return 0


def _key_steps(change: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    """A change (realtime-js shape) as what it does to the set of keys: ("remove", old key), ("add",
    new key)."""
    steps: list[tuple[str, Any]] = []
    old, new = change.get("old"), change.get("new")
    kind = change.get("eventType")
    moved = isinstance(new, dict) and isinstance(old, dict) and key in old and new.get(key) != old[key]
    if isinstance(old, dict) and key in old and (kind == "DELETE" or moved):
        steps.append(("remove", old[key]))
    if isinstance(new, dict) and key in new and kind != "DELETE":
        steps.append(("add", new[key]))
    return steps


def _follow(keys: set[Any], steps: list[tuple[str, Any]]) -> None:
    for step, value in steps:
        try:
            if step == "add":
                keys.add(value)
            else:
                keys.discard(value)
        except TypeError:  # an unhashable key: the probe cannot use this table
            continue


class Reconciling:
    """Makes each faction's `Reconciler`, and has the ingest tell it about its live changes."""

    def __init__(
        self,
        channels: Sequence[ChannelConfig],
        read: ReadSnapshot,
        ingest: ReconcileSink,
        *,
        interval_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
        wall_clock_ms: Callable[[], int],
        watch: DeafWatch | None = None,
    ) -> None:
        self._channels = list(channels)
        self.watch = watch
        self._read = read
        self._ingest = ingest
        self._interval_s = interval_s
        self._backoff_s = (backoff_initial_s, backoff_max_s)
        self._wall_clock_ms = wall_clock_ms
        self._snapshots = trio.CapacityLimiter(SNAPSHOTS_AT_ONCE)  # shared by every faction's reconciler

    def for_faction(self, faction_id: int) -> Reconciler:
        reconciler = Reconciler(
            faction_id,
            self._channels,
            self._read,
            self._ingest.reconciled,
            interval_s=self._interval_s,
            backoff=Backoff(*self._backoff_s),
            wall_clock_ms=self._wall_clock_ms,
            snapshots=self._snapshots,
            watch=self.watch,
        )
        self._ingest.watch_live_changes(faction_id, reconciler)
        return reconciler
