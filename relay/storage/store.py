"""Events and the relay's clock behind one async API: `Store`, opened by `open_store`.

Every event's stamp is assigned inside the transaction that stores it, through the database's one
write connection (`relay.storage.database`). Appends are group-committed: one committer task writes everything
appended while the previous commit was running in a single transaction, planned by
`relay.storage.planning`, so the number of fsyncs per second no longer bounds how many changes per second the
relay can take. Polls are answered from memory: the newest events of each faction, published only
after their commit returns. Subscriptions are kept by `relay.storage.subscriptions`, behind the same API.
Errors: `StoreError` for any storage fault; `MigrationError` from opening.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from relay.config import RetentionConfig
from relay.storage.database import Database, FileSizes, open_database
from relay.storage.database import StoreError as StoreError  # the storage API's error, named here for callers
from relay.storage.planning import Append, Item, Plan, Tombstones, encode, plan_batch, plan_chunk
from relay.storage.quarantine import QuarantineCounts, Unreadable, log_quarantined, parse_json
from relay.storage.retained import (
    RetainedEvents,
    UnreadableEvent,
    load_retained,
    quarantine_events,
    readable_events,
)
from relay.storage.retained import StoredEvent as StoredEvent  # a result type of the API, named here
from relay.storage.state import Lookup, Row, RowChange, RowKey, diff, row_key
from relay.storage.subscriptions import Subscription as Subscription  # a result type of the API, named here
from relay.storage.subscriptions import Subscriptions, load_subscriptions

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)

# /health proves the database writable by committing a no-op write, but not more often than this.
HEALTH_PROBE_INTERVAL_S = 1.0
# A reconcile stores its differences in chunks, each its own transaction, of at most this many events
# and (unless one event is larger) this much JSON: a stop (shutdown, the connection lost) waits for
# the chunk being written, never for the whole snapshot (100,000 rows in one transaction took 10 s on
# a 2-core VM, and blocked the event loop 3.4 s while planned), and what is committed stays: the next
# reconcile stores the rest. A full chunk is planned and committed in 0.1-0.2 s on that VM, 0.6 s at
# worst while other work loads it (of which planning, on the event loop, up to 0.45 s).
RECONCILE_CHUNK_EVENTS = 1_000
RECONCILE_CHUNK_BYTES = 1024 * 1024
DEFAULT_RETENTION = RetentionConfig()
# Pages read from the database and kept for the next member asking the same question: a few of the
# largest pages (`retention.memory_bytes_per_faction`, 512 KiB at the defaults).
DATABASE_PAGES_KEPT_BYTES = 4 * 1024 * 1024


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(eq=False, slots=True)
class _Pending:
    """One call waiting for the committer: events to append, or a snapshot to reconcile with."""

    faction_id: int
    items: list[Item]
    snapshot: _Snapshot | None = None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    stop_asked: bool = False  # its caller was cancelled: a reconcile stops after the chunk being written
    stored: list[StoredEvent] = dataclasses.field(default_factory=list)
    fault: StoreError | None = None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    table: str
    rows: dict[RowKey, Row]
    # The key values changed live, as the reconciler keeps noting them until the reconcile is stored:
    # read (copied, under the GIL) when the first chunk is planned, not when the snapshot is handed in.
    skip: AbstractSet[Any]
    commit_timestamp: str


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What the store keeps in memory, as the database holds it at start."""

    subscriptions: list[Subscription]
    retained: RetainedEvents
    high_water: int
    quarantined: QuarantineCounts


@dataclass(frozen=True)  # no slots: a frozen generic dataclass with slots cannot be made (Python 3.11)
class _State(Generic[R]):
    """A faction's current rows per table, and the cursor they correspond to."""

    timestamp: int
    tables: dict[str, list[R]]


FactionState = _State[Row]  # the rows parsed
StateTexts = _State[bytes]  # each row as the JSON text of an object, as stored


@dataclass(frozen=True, slots=True)
class FactionCounts:
    events_stored: int
    last_event_at: int | None


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    factions: int
    active_factions: int
    events_in_memory: int
    events_memory_bytes: int  # as `retention.memory_bytes` counts it
    database_pages_read: int  # answers' older events read from the database (one read per question)
    clock_high_water: int
    group_commits: int  # transactions that stored appended events, each holding one or more appends
    events_quarantined: int  # stored events that could not be read back, skipped (`quarantine.py`)
    faction_rows_quarantined: int
    changes_refused: int  # upstream changes or rows JSON cannot carry (NaN, nested too deep): not stored
    # Upstream changes Realtime sent incomplete (`Plan.stale`): an error record, or an UPDATE lacking
    # columns the stored row has. Never stored partial; each asks for a reconcile.
    changes_incomplete: int = 0


@asynccontextmanager
async def open_store(
    path: Path,
    *,
    retention: RetentionConfig = DEFAULT_RETENTION,
    now_ms: Callable[[], int] = wall_clock_ms,
    monotonic_s: Callable[[], float] = trio.current_time,
    key_columns: Mapping[str, str] | None = None,
) -> AsyncIterator[Store]:
    """Open (creating and migrating as needed) the database at `path`; on exit flush and close it.

    `now_ms` is the wall clock the stamps and the stored activity come from; `monotonic_s` the clock
    every duration is measured on (idleness, expiry), which no wall-clock step moves.
    `key_columns` maps each upstream table whose rows the store tracks to its key column.
    """
    database, loaded = await open_database(path, functools.partial(_load, retention=retention))
    store = Store(
        database,
        loaded,
        retention=retention,
        now_ms=now_ms,
        monotonic_s=monotonic_s,
        key_columns=key_columns or {},
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store._run_committer, name="store committer")
        try:
            yield store
        finally:
            # Writes are never abandoned, so shutdown waits for the final flush rather than losing it.
            with trio.CancelScope(shield=True):
                await store._close()  # which also ends the committer


class Store:
    """Create with `open_store`. Methods that cannot block are sync and answer from memory.

    The group committer lives here, not in a module of its own, because what a commit changes must
    change in one Trio step when it returns: the visible cursor, the faction rows, the tombstones and
    the events in memory. Subscriptions and the database seam share none of that, so they are apart.
    """

    def __init__(
        self,
        database: Database,
        loaded: _Loaded,
        *,
        retention: RetentionConfig,
        now_ms: Callable[[], int],
        monotonic_s: Callable[[], float],
        key_columns: Mapping[str, str],
    ) -> None:
        self._database = database
        # One answer carries at most what one faction may hold in memory: an old cursor is served a
        # page at a time (its next poll gets the next page), so no request holds more than that.
        self._answer_bytes = retention.memory_bytes_per_faction
        # Reads of events older than memory, at once: each holds up to _answer_bytes.
        self._database_reads_waiting: dict[tuple[int, int, int], trio.Event] = {}
        self._database_pages: OrderedDict[tuple[int, int, int], list[StoredEvent]] = OrderedDict()
        self._database_pages_bytes = 0
        self._database_pages_read = 0
        self._now_ms = now_ms
        self._monotonic_s = monotonic_s
        self._opened_at = monotonic_s()
        self._published_at: dict[int, float] = {}  # faction -> monotonic time of its newest event
        self._subscriptions = Subscriptions(database, loaded.subscriptions, now_ms, monotonic_s)
        self._retained = loaded.retained
        self._key_columns = dict(key_columns)
        self._quarantined = loaded.quarantined
        self._tombstones = Tombstones()
        self._pending_appends: list[_Pending] = []
        self._appends_waiting = trio.Event()  # set while _pending_appends is not empty
        self._group_commits = 0
        self._changes_refused = 0
        self._stale_rows: Callable[[int, str, str], None] | None = None
        self._changes_incomplete = 0
        self._closing = False
        self._committer_done = trio.Event()
        # Every stamp ever assigned or promised; the next stamp is above it. Only changed by the
        # write thread, under the write limiter.
        self._high_water = loaded.high_water
        # The cursor safe to hand out: no stamp at or below it can still be on its way to memory.
        # Only changed in Trio, when a commit has returned.
        self._visible = loaded.high_water

    def __repr__(self) -> str:
        return f"<Store factions={len(self._subscriptions)} cursor={self._visible}>"

    # --- events and the clock ---

    def cursor(self) -> int:
        """A cursor for an answer with no event: every event stored later is stamped above it."""
        return self._visible

    async def read_since(self, faction_id: int, since: int | None) -> tuple[list[StoredEvent], int]:
        """Kept events stamped after `since` (all when None), oldest first, and the next cursor: at
        most `retention.memory_bytes_per_faction` of them (one at least), the rest for the next read.

        From memory when the cursor is recent, which is every member keeping up, without a checkpoint;
        the older part of the window from the database. Ask `missed_since` after this returns: a trim
        during the read can take events it meant to return.
        """
        read = self._retained.read(faction_id, since, self._answer_bytes)
        found = read.in_memory
        if read.from_database:
            found = await self._database_page(faction_id, read.database_after, read.database_through) + found
        newest = read.newest
        # With nothing to answer, never a cursor below `since`: a /state read in the database may hand
        # out a cursor a moment before its commit is published here, and a member must not go back.
        return found, (newest if newest is not None else max(self._visible, since or 0))

    async def _database_page(self, faction_id: int, after: int, through: int) -> list[StoredEvent]:
        """The faction's events stamped in (after, through], from the database. Members far behind ask
        the same question (after a flood, a thousand streams resuming from one cursor): one read
        answers every caller waiting for it, and the newest pages read stay for the next ones. A
        page never changes (events are immutable; one trimmed meanwhile only makes it stale-but-true)."""
        place = (faction_id, after, through)
        kept = self._database_pages.get(place)
        if kept is not None:
            self._database_pages.move_to_end(place)
            return kept
        waiting = self._database_reads_waiting.get(place)
        if waiting is not None:
            await waiting.wait()
            kept = self._database_pages.get(place)
            return kept if kept is not None else await self._database_page(faction_id, after, through)
        done = self._database_reads_waiting[place] = trio.Event()
        try:
            # One at a time, as every read on the database's one read connection.
            page, unreadable = await self._database.read(
                functools.partial(_read_range, faction_id, after, through)
            )
            quarantine_events(unreadable, self._quarantined, self._retained)  # in Trio: one thread counts
            self._database_pages_read += 1
            self._database_pages[place] = page
            self._database_pages_bytes += sum(event.size for event in page)
            while self._database_pages_bytes > DATABASE_PAGES_KEPT_BYTES and len(self._database_pages) > 1:
                _, evicted = self._database_pages.popitem(last=False)
                self._database_pages_bytes -= sum(event.size for event in evicted)
            return page
        finally:
            del self._database_reads_waiting[place]
            done.set()

    def kept_count(self, faction_id: int) -> int:
        """How many events of the faction are kept (in memory or, the older ones, in the database)."""
        return self._retained.kept_count(faction_id)

    def has_events_since(self, faction_id: int, since: int | None) -> bool:
        """Whether `read_since` would find anything: what a held request waits for."""
        newest = self._retained.newest_timestamp(faction_id)
        return newest is not None and (since is None or newest > since)

    def quiet_for_ms(self, faction_id: int) -> int | None:
        """How long ago the faction's newest event was stored, on the monotonic clock (None: no event).

        Stamps are wall-clock ms kept strictly increasing, so after the wall clock steps back they run
        ahead of it until it catches up: `now - stamp` would say "just now" for as long as the step.
        An event loaded at start has no monotonic time: its wall-clock age, but never less than the
        time since start, which a clock set back cannot shrink.
        """
        newest = self._retained.newest_timestamp(faction_id)
        if newest is None:
            return None
        now = self._monotonic_s()
        published_at = self._published_at.get(faction_id)
        if published_at is not None:
            return int((now - published_at) * 1000)
        return max(self._now_ms() - newest, int((now - self._opened_at) * 1000))

    def missed_since(self, faction_id: int, since: int | None) -> bool:
        """Whether events after `since` are no longer retained: the answer is not the whole story."""
        return self._retained.missed_since(faction_id, since)

    def note_refused(self, faction_id: int, table: str, reason: str) -> None:
        """An upstream change, or a row a reconcile found, that JSON cannot carry was left out: upstream's
        data, not our fault, so one WARNING each and a count; the socket and the rest go on."""
        self._changes_refused += 1
        log.warning(
            "faction %d: a change to %s cannot be stored (%s); left out",
            faction_id,
            table,
            reason,
        )

    def watch_stale_rows(self, callback: Callable[[int, str, str], None]) -> None:
        """`callback(faction, table, why)` for each committed upstream change after which the faction's
        rows may differ from upstream's (`Plan.stale`): the ingest asks for a reconcile."""
        self._stale_rows = callback

    def note_lost(self, faction_id: int) -> None:
        """Changes of the faction were lost before they could be stored: a member whose cursor is
        before now is answered `truncated`, so it reloads /state."""
        self._retained.mark_lost(faction_id, self._visible)

    async def faction_state(self, faction_id: int) -> FactionState:
        """The faction's rows per tracked table, in key order, consistent with the cursor that comes
        with them: every event reflected in them is stamped at or below it, every other one above.

        Read in one transaction from the database, where the rows are kept (never in memory). The
        cursor is the clock as that transaction sees it, so it may be a moment ahead of `cursor()`;
        `read_since` never hands a member back a cursor below the one it brings.
        """
        return await self._read_state(faction_id, _table_rows, lambda state: state)

    async def faction_state_encoded(self, faction_id: int, encode: Callable[[StateTexts], T]) -> T:
        """`encode` of the faction's state as `faction_state` reads it, but each row as the JSON text
        it is stored as, called in the worker thread that read them: a faction's state can be tens of
        MB (67,025 rows are 59 MB of JSON). Parsing each row only to check it, and re-encoding none,
        halves the work, and no single call holds the GIL for the whole answer: one `json.dumps` of
        59 MB held it, and so stalled the event loop, for over half a second."""
        return await self._read_state(faction_id, _table_row_texts, encode)

    async def _read_state(
        self,
        faction_id: int,
        rows_of: Callable[[sqlite3.Connection, int, str, list[UnreadableRow]], list[R]],
        encode: Callable[[_State[R]], T],
    ) -> T:
        tables = list(self._key_columns)
        unreadable: list[UnreadableRow] = []

        def read(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                (cursor,) = conn.execute("SELECT high_water FROM relay_clock WHERE id = 1").fetchone()
                found = {table: rows_of(conn, faction_id, table, unreadable) for table in tables}
            finally:
                conn.execute("COMMIT")
            return encode(_State(cursor, found))

        encoded = await self._database.read(read)
        quarantine_rows(unreadable, self._quarantined)
        return encoded

    async def row_owners(self, places: Sequence[tuple[str, RowKey]]) -> dict[tuple[str, RowKey], int]:
        """The faction whose stored rows hold each (table, key): where a key-only DELETE belongs."""
        if not places:
            return {}

        def read(conn: sqlite3.Connection) -> dict[tuple[str, RowKey], int]:
            owners = {}
            for table, key in places:
                found = conn.execute(
                    "SELECT faction_id FROM faction_rows WHERE table_name = ? AND row_key = ? LIMIT 1",
                    (table, key),
                ).fetchone()
                if found is not None:
                    owners[(table, key)] = found[0]
            return owners

        return await self._database.read(read)

    async def advance_clock(self, since: int) -> None:
        """Lamport's rule: after this returns, every later event is stamped above `since`."""
        if since <= self._visible:
            return

        def advance(conn: sqlite3.Connection) -> None:
            # Also when no write is needed, passing through the write limiter waits for the writes
            # already stamped at or below `since` to be published.
            if since > self._high_water:
                conn.execute("UPDATE relay_clock SET high_water = ? WHERE id = 1", (since,))
                self._high_water = since

        await self._database.write(advance)
        self._visible = max(self._visible, since)

    async def keep_up_with_the_wall_clock(self) -> None:
        """Advance the relay's clock to the wall clock, written down, even with no event to stamp.

        After the wall clock steps back, stamps stay ahead of it (strictly increasing) until it catches
        up, and so do the cursors of every instance on that machine that stamped while it was ahead.
        An idle instance stamped nothing then; without this its cursor would be hours behind its
        neighbour's, and it would refuse (`max_clock_skew_s`) the cursors members bring over from it.
        """
        await self.advance_clock(self._now_ms())

    async def append_events(self, faction_id: int, items: Sequence[tuple[str, Any]]) -> list[StoredEvent]:
        """Stamp, commit, then publish `items` (type, data); returns them as stored.

        A `postgres_changes` item of a tracked table also updates the faction's rows, and a key-only
        `old` in it is served completed from the stored row. Once called, the append is carried out
        even if the caller is cancelled: the caller waits (shielded) for its commit, so that when this
        returns or raises, the events are published or refused. A storage fault fails every append
        of the same group commit with `StoreError`.
        """
        # Encoded up front, so that data JSON cannot carry (NaN: see `encode`) is refused unstamped.
        encoded = [(kind, data, encode(data)) for kind, data in items]
        if not encoded:
            return []
        return await self._submit(_Pending(faction_id, encoded))

    async def reconcile(
        self,
        faction_id: int,
        table: str,
        snapshot: Iterable[Row],
        *,
        skip: AbstractSet[Any],
        commit_timestamp: str,
    ) -> list[StoredEvent]:
        """Make the faction's stored rows of `table` equal `snapshot`, storing each difference as a
        `postgres_changes` event marked `resync`; rows whose key is in `skip` (changed live since the
        snapshot was read) are left as they are. Returns the events, in key order.

        The first reconcile of a faction's table is its baseline: the rows are stored without events
        and [] is returned, since a member's script learns a table's history by other means, as it
        does with Supabase Realtime, which never replays it (migrations/0004_faction_baselines.sql).

        `skip` may go on growing until this returns: it is read when the differences are worked out,
        in the write thread, so a live change delivered after the read but stored before the
        reconcile is not undone by it (a late change after that is stored after the reconcile).

        Stored in chunks of RECONCILE_CHUNK_EVENTS, each committed and published on its own, while
        appends wait their turn. A cancelled caller waits (shielded) for the chunk being written and
        no more: the chunks committed stay, consistent, and the next reconcile stores the rest.
        """
        key_column = self._key_columns[table]
        rows = {row_key(row[key_column]): row for row in snapshot}
        wanted = _Snapshot(table, rows, skip, commit_timestamp)
        return await self._submit(_Pending(faction_id, [], wanted), stoppable=True)

    async def _submit(self, pending: _Pending, *, stoppable: bool = False) -> list[StoredEvent]:
        # A caller cancelled before it asks appends nothing; Trio's rule that every async call is a
        # checkpoint keeps a loop of appends (each wait shielded) from never seeing its cancellation.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closing:
            raise StoreError("the store is closing")
        self._pending_appends.append(pending)
        self._appends_waiting.set()
        try:
            if stoppable:
                await pending.done.wait()
        finally:
            # Cancelled or not, the write in progress is seen out; only a reconcile stops early.
            pending.stop_asked = stoppable and not pending.done.is_set()
            with trio.CancelScope(shield=True):
                await pending.done.wait()
        if pending.fault is not None:
            raise StoreError(str(pending.fault)) from pending.fault
        return pending.stored

    async def _run_committer(self) -> None:
        """Commit whatever was appended while the previous commit ran, one batch at a time, until the
        store closes with nothing left.

        Shielded: a caller waits (shielded) for its append's answer, so the committer must outlive a
        cancelled relay (a test's nursery, a second Ctrl-C) until `_close` has seen every append out.
        """
        with trio.CancelScope(shield=True):
            while not (self._closing and not self._pending_appends):
                await self._appends_waiting.wait()
                await self._commit_pending()
        self._committer_done.set()

    async def _commit_pending(self) -> None:
        batch, self._pending_appends = self._pending_appends, []
        self._appends_waiting = trio.Event()
        # In order: each run of appends in one transaction, each reconcile in chunks of its own.
        while batch:
            if batch[0].snapshot is not None:
                await self._commit_reconcile(batch.pop(0))
                continue
            appends = list(itertools.takewhile(lambda pending: pending.snapshot is None, batch))
            del batch[: len(appends)]
            requests = [Append(pending.faction_id, pending.items) for pending in appends]
            plan = functools.partial(
                plan_batch, requests, tombstones=self._tombstones, key_columns=self._key_columns
            )
            fault = await self._commit(plan, appends)
            for pending in appends:
                pending.fault = fault
                pending.done.set()

    async def _commit_reconcile(self, pending: _Pending) -> None:
        """Store a snapshot's differences a chunk at a time, until done, a fault, or a stop.

        Compared with the rows as the database holds them when the first chunk is planned, and
        planned chunk by chunk (the keys are disjoint, and no append is committed in between), so the
        chunks committed are exactly a prefix of one diff.
        """
        snapshot = pending.snapshot
        assert snapshot is not None
        key_column = self._key_columns[snapshot.table]
        changes: Iterator[dict[str, Any]] | None = None
        finished = baseline = False
        rows_taken = 0

        def next_chunk(rows: Lookup, conn: sqlite3.Connection, unreadable: list[UnreadableRow]) -> Plan:
            nonlocal changes, finished, baseline, rows_taken
            if changes is None:
                baseline = not _has_baseline(conn, pending.faction_id, snapshot.table)
                current = dict(_keyed_table_rows(conn, pending.faction_id, snapshot.table, unreadable))
                # set() of a set is one C call under the GIL: no Trio-side add can tear it.
                skipped = frozenset(row_key(value) for value in set(snapshot.skip))
                changes = diff(
                    snapshot.table,
                    current,
                    snapshot.rows,
                    skip=skipped,
                    commit_timestamp=snapshot.commit_timestamp,
                )
            plan, finished = plan_chunk(
                pending.faction_id,
                key_column,
                changes,
                rows,
                max_events=RECONCILE_CHUNK_EVENTS,
                max_bytes=RECONCILE_CHUNK_BYTES,
                baseline=baseline,
            )
            if baseline:
                rows_taken += len(plan.row_changes)
                if finished:
                    plan.baselines.append((pending.faction_id, snapshot.table))
            return plan

        while not (finished or pending.stop_asked or self._closing):
            pending.fault = await self._commit(next_chunk, [pending], with_connection=True)
            if pending.fault is not None:
                break
        if baseline and finished and pending.fault is None:
            log.info(
                "%r: faction %d's first read of %s taken as its rows without events (%d row changes)",
                self,
                pending.faction_id,
                snapshot.table,
                rows_taken,
            )
        if not finished and pending.fault is None:
            log.info(
                "%r: reconcile of faction %d stopped after %d events; the next one stores the rest",
                self,
                pending.faction_id,
                len(pending.stored),
            )
            if not pending.stop_asked:
                pending.fault = StoreError("the store closed during a reconcile")
        pending.done.set()

    async def _commit(
        self, make_plan: Callable[..., Plan], sources: Sequence[_Pending], *, with_connection: bool = False
    ) -> StoreError | None:
        """Plan (against the faction rows the database holds), stamp and insert the plan's events and
        apply its row changes in one transaction, then publish each event to memory and to its source;
        the fault, if the write failed (nothing is published then).

        Planned in the write thread, where the rows are: faction state is never held in memory (rows
        reach a megabyte each), and a large batch's planning does not hold up the event loop.
        """
        stored: list[StoredEvent] = []
        unreadable: list[UnreadableRow] = []

        def insert(conn: sqlite3.Connection) -> Plan:
            rows = _row_lookup(conn, unreadable)
            plan: Plan = make_plan(rows, conn, unreadable) if with_connection else make_plan(rows)
            for planned in plan.events:
                # Burnt on failure (never reused), which only leaves a gap.
                self._high_water = stamp = max(self._now_ms(), self._high_water + 1)
                row = conn.execute(
                    "INSERT INTO events (faction_id, timestamp, type, data) VALUES (?, ?, ?, ?)",
                    (planned.faction_id, stamp, planned.type, planned.data_json),
                )
                assert row.lastrowid is not None
                stored.append(
                    StoredEvent.build(
                        row.lastrowid, planned.faction_id, stamp, planned.type, planned.data_json
                    )
                )
            _write_rows(conn, plan.row_changes)
            conn.executemany(
                "INSERT OR IGNORE INTO faction_baselines (faction_id, table_name) VALUES (?, ?)",
                plan.baselines,
            )
            if plan.events:
                conn.execute("UPDATE relay_clock SET high_water = ? WHERE id = 1", (self._high_water,))
            return plan

        # Shielded: once committed, an event must reach memory, or pollers would never see it.
        with trio.CancelScope(shield=True):
            try:
                plan = await self._database.write(insert)
            except StoreError as exc:
                return exc
            except Exception as exc:
                # A bug in planning: rolled back, and reported to the writers like a storage fault.
                # Left to end the committer, it would leave every writer of every faction waiting.
                log.exception("%r: a commit failed unexpectedly; nothing of it was stored", self)
                return StoreError(f"commit failed unexpectedly: {exc!r}")
            finally:
                quarantine_rows(unreadable, self._quarantined)
            for faction_id, table, reason in plan.refused:
                self.note_refused(faction_id, table, reason)
            self._changes_incomplete += len(plan.stale)
            if self._stale_rows is not None:
                for faction_id, table, reason in plan.stale:
                    self._stale_rows(faction_id, table, reason)
            if not plan.events and not plan.row_changes:
                return None
            self._group_commits += 1
            # No checkpoint between the commit returning and these lines: publishing, the tombstones and
            # the cursor change in the same Trio step, before the next writer's result can be handled.
            self._tombstones.remember(plan.tombstones)
            published_at = self._monotonic_s()
            for planned, event in zip(plan.events, stored, strict=True):
                sources[planned.source].stored.append(event)
                self._retained.publish(event)
                self._published_at[event.faction_id] = published_at
            if stored:
                self._visible = max(self._visible, stored[-1].timestamp)
        return None

    # --- subscriptions, kept by `Subscriptions` ---

    async def subscribe(self, faction_id: int) -> Subscription:
        """Active from now on; idempotent (the first `subscribed_at` is kept), and counts as activity."""
        return await self._subscriptions.subscribe(faction_id)

    async def revive(self, faction_id: int) -> Subscription:
        """A known faction polled after it expired: active again, as if it had re-subscribed."""
        return await self._subscriptions.revive(faction_id)

    async def stand_by(self, faction_id: int) -> Subscription:
        """Known from now on but inactive, so that a later poll revives it; a known faction, active
        or not, is left as it is. What another relay instance's faction looks like here (see
        deploy/nginx.conf): this instance takes over its polls only if that instance goes away."""
        return await self._subscriptions.stand_by(faction_id)

    def subscription(self, faction_id: int) -> Subscription | None:
        return self._subscriptions.get(faction_id)

    def active_factions(self) -> list[int]:
        return self._subscriptions.active()

    def known_factions(self) -> list[int]:
        """Every faction ever subscribed, expired ones included."""
        return self._subscriptions.known()

    def touch(self, faction_id: int) -> None:
        """A request about the faction: activity, kept in memory (a write per poll would be wasteful)."""
        self._subscriptions.touch(faction_id)

    def last_activity_at(self, faction_id: int) -> int | None:
        subscription = self._subscriptions.get(faction_id)
        return subscription.last_activity_at if subscription else None

    async def flush_activity(self) -> None:
        """Write the activity that `touch` kept in memory."""
        await self._subscriptions.flush_activity()

    async def expire_idle(self, idle_for_ms: int) -> list[int]:
        """Deactivate the active factions nobody asked about for `idle_for_ms` on the monotonic clock
        (since the store opened, at most: a restart counts as activity); returns their ids."""
        return await self._subscriptions.expire_idle(idle_for_ms)

    # --- upkeep and introspection ---

    async def trim(self) -> int:
        """Delete the events no longer kept (`relay.storage.retained`: by count and by size per
        faction); returns how many."""
        dropped = sorted(self._retained.dropped().items())

        def delete(conn: sqlite3.Connection) -> int:
            deleted = 0
            for faction_id, up_to in dropped:
                deleted += conn.execute(
                    "DELETE FROM events WHERE faction_id = ? AND timestamp <= ?", (faction_id, up_to)
                ).rowcount
            return deleted

        return await self._database.write(delete)

    async def checkpoint(self) -> None:
        """Fold the WAL back into the database file and truncate it, so it cannot grow without bound."""
        await self._database.checkpoint()

    async def counts(self) -> dict[int, FactionCounts]:
        rows = await self._database.read(
            lambda conn: conn.execute(
                "SELECT faction_id, count(*), max(timestamp) FROM events GROUP BY faction_id"
            ).fetchall()
        )
        return {faction_id: FactionCounts(count, newest) for faction_id, count, newest in rows}

    async def check_health(self) -> None:
        """Raise `StoreError` (saying why) unless the database can be read and written right now.

        Reading alone would call a full disk or a locked file healthy, so this also commits a small
        real change (relay_health.probed_at), at most once per HEALTH_PROBE_INTERVAL_S; between
        probes the outcome of the last real write stands.
        """
        database = self._database
        if (fault := database.check_file()) is not None:
            raise StoreError(fault)
        await database.read(lambda conn: conn.execute("SELECT high_water FROM relay_clock").fetchall())
        if trio.current_time() - database.last_write_at >= HEALTH_PROBE_INTERVAL_S:
            now = self._now_ms()
            await database.write(lambda conn: conn.execute("UPDATE relay_health SET probed_at = ?", (now,)))
        elif database.write_fault is not None:
            raise StoreError(database.write_fault)

    def file_fault(self) -> str | None:
        """Why the database's path no longer leads to the file the relay has open (deleted, replaced or
        moved), or None; checked again by this call (a `stat`)."""
        return self._database.check_file()

    def write_fault(self) -> str | None:
        """Why the database's latest write failed, or None once one works again (a write after the
        fault ends: an event, a maintenance pass, a /health probe)."""
        return self._database.write_fault

    def file_sizes(self) -> FileSizes:
        """The database file and its write-ahead log, in bytes: a `stat` each, cheap enough to call
        from Trio. The maintenance checkpoint truncates the log; between passes it grows."""
        return self._database.file_sizes()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            factions=len(self._subscriptions),
            active_factions=len(self._subscriptions.active()),
            events_in_memory=len(self._retained),
            events_memory_bytes=self._retained.memory_bytes,
            database_pages_read=self._database_pages_read,
            clock_high_water=self._high_water,
            group_commits=self._group_commits,
            events_quarantined=self._quarantined.events,
            faction_rows_quarantined=self._quarantined.faction_rows,
            changes_refused=self._changes_refused,
            changes_incomplete=self._changes_incomplete,
        )

    async def _close(self) -> None:
        """Bounded: the committer ends after the append or reconcile chunk in progress, then the final
        flush and checkpoint wait a short while at most (`Database.close`)."""
        self._closing = True  # no new appends; the committer finishes the ones already made
        self._appends_waiting.set()
        await self._committer_done.wait()
        await self._database.close(last_writes=self.flush_activity)


def _write_rows(conn: sqlite3.Connection, changes: Sequence[RowChange]) -> None:
    for change in changes:
        if change.row is None:
            conn.execute(
                "DELETE FROM faction_rows WHERE faction_id = ? AND table_name = ? AND row_key = ?",
                (change.faction_id, change.table, change.key),
            )
        else:
            conn.execute(
                "INSERT OR REPLACE INTO faction_rows (faction_id, table_name, row_key, row) VALUES (?, ?, ?, ?)",
                (change.faction_id, change.table, change.key, encode(change.row)),
            )


def _read_range(
    faction_id: int, after: int, through: int, conn: sqlite3.Connection
) -> tuple[list[StoredEvent], list[UnreadableEvent]]:
    unreadable: list[UnreadableEvent] = []
    rows = conn.execute(
        "SELECT id, faction_id, timestamp, CAST(type AS BLOB), CAST(data AS BLOB) FROM events"
        " WHERE faction_id = ? AND timestamp > ? AND timestamp <= ? ORDER BY timestamp",
        (faction_id, after, through),
    )
    return list(readable_events(rows, unreadable)), unreadable


def _load(conn: sqlite3.Connection, retention: RetentionConfig) -> _Loaded:
    # Both count: a clock advance survives only in relay_clock, an event's stamp is in its row.
    (high_water,) = conn.execute(
        "SELECT max((SELECT high_water FROM relay_clock WHERE id = 1),"
        " (SELECT coalesce(max(timestamp), 0) FROM events))"
    ).fetchone()
    quarantined = QuarantineCounts()
    retained = load_retained(conn, retention, quarantined)
    return _Loaded(load_subscriptions(conn), retained, high_water, quarantined)


UnreadableRow = tuple[int, str, RowKey, Unreadable]  # a faction row that cannot be read back, and why


def quarantine_rows(unreadable: Iterable[UnreadableRow], quarantined: QuarantineCounts) -> None:
    """Count and log each unreadable faction row once. Treated as missing where it was read, so the
    next reconcile finds the upstream row missing and stores it again over it."""
    for faction_id, table, key, reason in unreadable:
        if quarantined.note_faction_row(faction_id, table, key):
            log_quarantined("faction row", f"{table}/{key}", faction_id, reason)


def _parsed_row(
    faction_id: int, table: str, key: RowKey, raw: object, unreadable: list[UnreadableRow]
) -> Row | None:
    try:
        row = parse_json(raw)
        if not isinstance(row, dict):
            raise Unreadable(f"not an object: {type(row).__name__}")
    except Unreadable as reason:
        unreadable.append((faction_id, table, key, reason))
        return None
    return row


def _row_lookup(conn: sqlite3.Connection, unreadable: list[UnreadableRow]) -> Lookup:
    """The faction rows as the database holds them at the start of one commit, one by its key (the
    primary key), read as BLOBs. Each row is read once per commit: planning a change looks at its row
    two or three times (to complete `old`, to see whether it changes anything), and the planner keeps
    its own overlay of what the commit changes."""
    read: dict[tuple[int, str, RowKey], Row | None] = {}

    def lookup(faction_id: int, table: str, key: RowKey) -> Row | None:
        place = (faction_id, table, key)
        if place not in read:
            found = conn.execute(
                "SELECT CAST(row AS BLOB) FROM faction_rows WHERE faction_id = ? AND table_name = ?"
                " AND row_key = ?",
                place,
            ).fetchone()
            read[place] = None if found is None else _parsed_row(faction_id, table, key, found[0], unreadable)
        return read[place]

    return lookup


def _has_baseline(conn: sqlite3.Connection, faction_id: int, table: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM faction_baselines WHERE faction_id = ? AND table_name IN (?, '*')", (faction_id, table)
    ).fetchone()
    return found is not None


def _table_rows(
    conn: sqlite3.Connection, faction_id: int, table: str, unreadable: list[UnreadableRow]
) -> list[Row]:
    """One faction's rows of one table, in key order (the text order of their keys as JSON)."""
    return [row for _, row in _keyed_table_rows(conn, faction_id, table, unreadable)]


def _keyed_table_rows(
    conn: sqlite3.Connection, faction_id: int, table: str, unreadable: list[UnreadableRow]
) -> Iterator[tuple[RowKey, Row]]:
    for key, raw in _stored_rows(conn, faction_id, table):
        row = _parsed_row(faction_id, table, key, raw, unreadable)
        if row is not None:
            yield key, row


def _table_row_texts(
    conn: sqlite3.Connection, faction_id: int, table: str, unreadable: list[UnreadableRow]
) -> list[bytes]:
    """`_table_rows`, each row as its stored text: the relay stores a row as the compact JSON its
    answers are made of (`relay.storage.planning.encode`), so the text is the row's answer as is. A
    row that does not parse is left out here as there."""
    return [
        raw
        for key, raw in _stored_rows(conn, faction_id, table)
        if _parsed_row(faction_id, table, key, raw, unreadable) is not None
    ]


def _stored_rows(conn: sqlite3.Connection, faction_id: int, table: str) -> sqlite3.Cursor:
    return conn.execute(
        "SELECT row_key, CAST(row AS BLOB) FROM faction_rows WHERE faction_id = ? AND table_name = ?"
        " ORDER BY row_key",
        (faction_id, table),
    )
