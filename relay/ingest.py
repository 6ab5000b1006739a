"""The one way an event enters the relay: stored, then the faction's waiters woken, then counted.

Three sources write events: the faction's upstream socket (and the relay-wide DELETE socket, routed
by key), its reconciles, and members publishing. Each goes through `Ingest`, so "notify only after
the commit returned" (style habit 6) holds by construction: nothing else calls `Hub.notify`.

An upstream change is also live news for a snapshot read in flight: the faction's reconciler is told
before the change is stored, so that a change still waiting for its commit keeps its key out of the
comparison (`relay.upstream.reconcile`). And a stored upstream change may be the row a parked shared DELETE was
waiting for (`relay.upstream.shared_deletes`): that DELETE follows it here, through the same path.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import trio

from relay.config import ChannelConfig
from relay.hub import Hub
from relay.storage.planning import CHANGE_TYPE, UnstorableData, encode
from relay.storage.state import ERROR_RECORD
from relay.storage.store import Store, StoredEvent, StoreError
from relay.traffic import Source, Traffic
from relay.upstream.phoenix import ChangeReceived
from relay.upstream.shared_deletes import DeleteRouter, RouterStatistics, filter_columns
from relay.upstream.supervisor import DeliveryFailed

log = logging.getLogger(__name__)


class LiveChangeWatcher(Protocol):
    def note_live_change(self, table: str, change: dict[str, Any]) -> None: ...

    def request(self, reason: str) -> None: ...


class Ingest:
    def __init__(
        self,
        store: Store,
        hub: Hub,
        traffic: Traffic,
        *,
        key_columns: Mapping[str, str],
        channels: Iterable[ChannelConfig],
    ) -> None:
        self._store = store
        self._hub = hub
        self._traffic = traffic
        # Held weakly: a faction's reconciler lives as long as its supervisor, and a revived faction
        # gets a new one.
        self._watchers: weakref.WeakValueDictionary[int, LiveChangeWatcher] = weakref.WeakValueDictionary()
        # Per faction: losses noted (`changes_lost`), and those already covered by a stored batch.
        self._losses: dict[int, int] = {}
        self._losses_marked: dict[int, int] = {}
        self._router = DeleteRouter(
            key_columns, store.row_owners, self._routed_deletes, filter_columns=filter_columns(channels)
        )
        store.watch_stale_rows(self._stale_rows)

    def __repr__(self) -> str:
        return "Ingest"

    def watch_live_changes(self, faction_id: int, watcher: LiveChangeWatcher) -> None:
        """Tell `watcher` about every upstream change of the faction from now on, before it is stored."""
        self._watchers[faction_id] = watcher

    async def upstream(self, faction_id: int, changes: Sequence[ChangeReceived]) -> list[StoredEvent]:
        """Changes from the faction's socket, or DELETEs routed to it from the shared one."""
        self._traffic.upstream_changed(faction_id, trio.current_time())
        losses = self._losses.get(faction_id, 0)
        try:
            try:
                stored = await self._store.append_events(
                    faction_id, [(CHANGE_TYPE, change.data) for change in changes]
                )
            except UnstorableData:  # refused before anything was stamped: store the rest
                stored = await self._store.append_events(faction_id, self._storable(faction_id, changes))
        except StoreError as exc:
            # The connection ends and is retried with backoff; these changes were never served.
            raise DeliveryFailed(f"{len(changes)} change(s) not stored: {exc}") from exc
        if self._losses.get(faction_id, 0) > self._losses_marked.get(faction_id, 0):
            # The batch read after a gap: its members must not take it for the whole story. Marked
            # before the wake-up, so no held poll answers it without `truncated`; a loss during the
            # write came after some of these changes, so the next batch is marked too.
            self._store.note_lost(faction_id)
            self._losses_marked[faction_id] = losses
        self._stored(faction_id, Source.UPSTREAM, len(stored))
        await self._router.stored(faction_id, changes)
        return stored

    async def _routed_deletes(self, faction_id: int, changes: Sequence[ChangeReceived]) -> None:
        """DELETEs routed to the faction from the shared socket. Its reconciler is told here, before the
        await (a change waiting for its commit counts too); the faction's own socket tells it of its
        changes as each is read."""
        watcher = self._watchers.get(faction_id)
        if watcher is not None:
            for change in changes:
                watcher.note_live_change(change.table, change.data)
        await self.upstream(faction_id, changes)

    def _stale_rows(self, faction_id: int, table: str, reason: str) -> None:
        """A stored change left the faction's rows possibly unlike upstream's (an error record, an
        UPDATE without some columns: `relay.storage.state.complete_change`): its reconciler reads the
        table again as soon as it can. An error record is upstream's fault, so a WARNING."""
        if reason.startswith(ERROR_RECORD):
            log.warning("faction %d: %s: %s; reconciling", faction_id, table, reason)
        watcher = self._watchers.get(faction_id)
        if watcher is not None:
            watcher.request(f"{table}: {reason}")

    def changes_lost(self, faction_id: int) -> None:
        """The faction's socket dropped changes it could not keep (a flood): members behind now are
        answered `truncated` at once, and again after the next batch is stored (see `upstream`)."""
        told = self._losses.get(faction_id, 0) > self._losses_marked.get(faction_id, 0)
        self._losses[faction_id] = self._losses.get(faction_id, 0) + 1
        self._store.note_lost(faction_id)
        if not told:  # a flood drops a change per frame read: wake the members once, not each time
            self._hub.notify(faction_id)

    def _storable(self, faction_id: int, changes: Sequence[ChangeReceived]) -> list[tuple[str, Any]]:
        """The changes as items to store, less any JSON cannot carry (NaN, nesting too deep): such a
        change is upstream's data, not our bug, so it is dropped with one WARNING and the connection
        and the rest of the batch go on; the reconcile cannot store that row either until it changes."""
        items = []
        for change in changes:
            try:
                encode(change.data)
            except UnstorableData as exc:
                self._store.note_refused(faction_id, change.table, str(exc))
                continue
            items.append((CHANGE_TYPE, change.data))
        return items

    async def route_shared_deletes(self, changes: Sequence[ChangeReceived]) -> None:
        """DELETEs from the relay-wide socket: each to the faction holding its row, or parked.

        Each is live news for every faction's snapshot read in flight, not only the owner's: a faction
        whose first read is on the way does not hold the row yet, so its DELETE is parked and dropped,
        and the read (made before the DELETE) must not bring the row back. A faction that never had
        the row loses nothing by leaving its key alone."""
        for watcher in list(self._watchers.values()):
            for change in changes:
                watcher.note_live_change(change.table, change.data)
        await self._router.route(changes)

    async def reconciled(
        self, faction_id: int, table: str, rows: list[dict[str, Any]], skip: AbstractSet[Any], read_at: str
    ) -> int:
        """A table's rows as upstream holds them now: the differences are stored as resync events."""
        events = await self._store.reconcile(faction_id, table, rows, skip=skip, commit_timestamp=read_at)
        if events:
            self._stored(faction_id, Source.RECONCILE, len(events))
        return len(events)

    async def published(self, faction_id: int, event_type: str, data: object) -> StoredEvent:
        """An event a member published (`POST /events` and the legacy paths)."""
        (stored,) = await self._store.append_events(faction_id, [(event_type, data)])
        self._stored(faction_id, Source.PUBLISHED, 1)
        return stored

    def _stored(self, faction_id: int, source: Source, count: int) -> None:
        self._hub.notify(faction_id)
        self._traffic.stored(faction_id, source, count, trio.current_time())

    def shared_deletes_statistics(self) -> RouterStatistics:
        return self._router.statistics()
