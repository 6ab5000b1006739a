"""The store on real SQLite files: cursors, stamping across restarts, retention, subscriptions.

These tests use worker threads, so they run on the real Trio clock (no autojump); the wall clock the
store stamps with is a hand-set fake that can also hold one call inside the write thread, which is how
a write "in progress" is made deterministic.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from relay.config import RetentionConfig
from relay.storage.database import CLOSE_BUSY_TIMEOUT_MS, CLOSE_CHECKPOINT_S
from relay.storage.state import row_key
from relay.storage.store import (
    RECONCILE_CHUNK_EVENTS,
    FactionCounts,
    Store,
    StoredEvent,
    StoreError,
    Subscription,
    open_store,
)
from tests.helpers.clocks import DAY_MS, Clocks

pytestmark = pytest.mark.unit

FACTION = 46666
OTHER = 11581
THIRD = 9001
START_MS = 1_732_460_000_000
TEST_TIMEOUT_S = 10
WATCH_INTERVAL_S = 0.0002
# A held clock call gives up after this long, so a failing test cannot leave a write thread stuck.
HOLD_LIMIT_S = 5


class WallClock(Clocks):
    """The test's clocks (`elapse` moves both, setting `now_ms` alone steps the wall clock), and
    `hold`, which parks one future call of the wall clock until released."""

    def __init__(self, now_ms: int = START_MS) -> None:
        super().__init__(now_ms)
        self.calls = 0
        self.holding = threading.Event()
        self._release = threading.Event()
        self._hold_at: int | None = None

    def __call__(self) -> int:
        self.calls += 1
        if self.calls == self._hold_at:
            self.holding.set()
            self._release.wait(HOLD_LIMIT_S)
        return self.now_ms

    @contextmanager
    def hold(self, nth_call: int) -> Iterator[None]:
        """Park the `nth_call`-th call from now until the block ends."""
        self._hold_at = self.calls + nth_call
        try:
            yield
        finally:
            self._release.set()

    async def wait_until_holding(self) -> None:
        assert await trio.to_thread.run_sync(self.holding.wait, HOLD_LIMIT_S)


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "relay.db"


def open_test_store(
    tmp_path: Path, clock: WallClock, *, events_per_faction: int = 100
) -> AbstractAsyncContextManager[Store]:
    return open_store(
        db_path(tmp_path),
        retention=RetentionConfig(events_per_faction=events_per_faction),
        now_ms=clock,
        monotonic_s=clock.monotonic_s,
    )


def query(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    """What an operator would see with the sqlite3 shell."""
    with closing(sqlite3.connect(db_path(tmp_path), isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


def refuse_poison(tmp_path: Path) -> None:
    """From now on, inserting an event of type "poison" fails inside the write, as a full disk would."""
    query(
        tmp_path,
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.type = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
    )


def timestamps(events: list[StoredEvent]) -> list[int]:
    return [event.timestamp for event in events]


async def all_retained(store: Store) -> list[StoredEvent]:
    return [
        event for faction in (FACTION, OTHER, THIRD) for event in (await store.read_since(faction, None))[0]
    ]


async def test_the_database_is_created_in_wal_mode(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock()) as store:
            await store.check_health()
            assert query(tmp_path, "PRAGMA journal_mode") == [("wal",)]
        # Closing checkpoints with TRUNCATE: the WAL is folded back into the file.
        wal = db_path(tmp_path).with_name("relay.db-wal")
        assert not wal.exists() or wal.stat().st_size == 0


async def test_appended_events_are_read_oldest_first(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            data = [{"table": "war_calls", "n": n} for n in range(3)]
            stored = await store.append_events(FACTION, [("postgres_changes", d) for d in data])
            found, cursor = await store.read_since(FACTION, None)
            assert found == stored
            assert [event.data() for event in found] == data
            assert timestamps(found) == [START_MS, START_MS + 1, START_MS + 2]
            assert cursor == found[-1].timestamp == store.cursor()
            assert json.loads(found[0].json) == {
                "id": found[0].id,
                "type": "postgres_changes",
                "timestamp": START_MS,
                "data": data[0],
            }
            assert " " not in found[0].json  # compact: it goes out on every poll
            assert (await store.read_since(OTHER, None)) == ([], store.cursor())


async def test_since_returns_only_later_events(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            first, second, third = await store.append_events(FACTION, [("t", 1), ("t", 2), ("t", 3)])
            assert (await store.read_since(FACTION, first.timestamp)) == ([second, third], third.timestamp)
            assert (await store.read_since(FACTION, first.timestamp - 1))[0] == [first, second, third]
            assert (await store.read_since(FACTION, third.timestamp)) == ([], store.cursor())
            assert (await store.read_since(FACTION, None))[0] == [first, second, third]


async def test_memory_keeps_the_newest_events_per_faction(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock(), events_per_faction=3) as store:
            stored = await store.append_events(FACTION, [("t", n) for n in range(5)])
            await store.append_events(OTHER, [("t", "other")])
            assert (await store.read_since(FACTION, None))[0] == stored[-3:]
            assert store.statistics().events_in_memory == 4
            # The database keeps them all until `trim` runs.
            assert (await store.counts())[FACTION].events_stored == 5


async def test_events_survive_reopening_unchanged(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            stored = await store.append_events(FACTION, [("postgres_changes", {"n": n}) for n in range(4)])
            other = await store.append_events(OTHER, [("hospital_update", [1, 2])])
            cursor = store.cursor()
        async with open_test_store(tmp_path, clock, events_per_faction=2) as store:
            assert (await store.read_since(FACTION, None))[0] == stored[-2:]  # same id, timestamp and json
            assert (await store.read_since(OTHER, None))[0] == other
            assert store.cursor() == cursor


async def test_stamps_increase_when_the_wall_clock_stands_still_or_goes_back(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            seen = await store.append_events(FACTION, [("t", 1), ("t", 2)])
            seen += await store.append_events(OTHER, [("t", 3)])
            clock.now_ms -= 60_000  # an NTP step backwards
            seen += await store.append_events(FACTION, [("t", 4)])
            clock.now_ms += 120_000
            seen += await store.append_events(FACTION, [("t", 5)])
            assert timestamps(seen) == [START_MS, START_MS + 1, START_MS + 2, START_MS + 3, START_MS + 60_000]
        clock.now_ms = START_MS - 3_600_000  # restarted on a machine whose clock is an hour behind
        async with open_test_store(tmp_path, clock) as store:
            (after_restart,) = await store.append_events(FACTION, [("t", 6)])
            assert after_restart.timestamp == START_MS + 60_001


async def test_a_future_since_pushes_the_clock_also_across_restarts(tmp_path: Path) -> None:
    clock = WallClock()
    ahead = START_MS + 300_000  # a member whose browser clock runs five minutes fast
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            await store.advance_clock(ahead)
            assert store.cursor() == ahead
            assert (await store.read_since(FACTION, ahead)) == ([], ahead)
            (event,) = await store.append_events(FACTION, [("t", 1)])
            assert event.timestamp == ahead + 1
            await store.advance_clock(ahead + 1_000)
        assert query(tmp_path, "SELECT high_water FROM relay_clock") == [(ahead + 1_000,)]
        async with open_test_store(tmp_path, clock) as store:
            # No event was stored after the advance: only relay_clock remembers it.
            assert store.cursor() == ahead + 1_000
            (event,) = await store.append_events(FACTION, [("t", 2)])
            assert event.timestamp == ahead + 1_001


async def test_a_since_behind_the_cursor_writes_nothing(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock()) as store:
            await store.append_events(FACTION, [("t", 1)])
            await store.advance_clock(START_MS - 5_000)
            assert store.cursor() == START_MS
            assert query(tmp_path, "SELECT high_water FROM relay_clock") == [(START_MS,)]


async def test_a_cursor_handed_out_during_a_write_is_below_its_stamps(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            (earlier,) = await store.append_events(FACTION, [("t", 0)])
            clock.now_ms += 1_000
            written: list[StoredEvent] = []
            advanced = trio.Event()

            async def append() -> None:
                written.extend(await store.append_events(FACTION, [("t", 1), ("t", 2)]))

            async def advance() -> None:
                # A client whose since equals the stamp of the event being written right now.
                await store.advance_clock(clock.now_ms)
                advanced.set()

            async with trio.open_nursery() as nursery:
                # Hold the second event's clock call: by then the first is stamped and inserted.
                with clock.hold(2):
                    nursery.start_soon(append)
                    await clock.wait_until_holding()
                    nursery.start_soon(advance)
                    await trio.testing.wait_all_tasks_blocked()
                    # The first event is stamped, but neither it nor its stamp is visible yet.
                    assert store.statistics().clock_high_water == clock.now_ms
                    assert (await store.read_since(FACTION, earlier.timestamp)) == ([], earlier.timestamp)
                    handed_out = [store.cursor(), (await store.read_since(OTHER, None))[1]]
                    assert not advanced.is_set()  # the advance waits for the write to be published
            assert handed_out == [earlier.timestamp, earlier.timestamp]
            assert all(cursor < event.timestamp for cursor in handed_out for event in written)
            assert (await store.read_since(FACTION, earlier.timestamp))[0] == written
            assert store.cursor() >= clock.now_ms


async def test_no_cursor_reaches_an_event_published_after_it(tmp_path: Path) -> None:
    """Concurrent writers and clock advances; whatever the interleaving, the invariant holds."""
    clock = WallClock()  # standing still, so the stamps and the advances compete for the same values
    observed: list[tuple[int, set[int]]] = []  # (a cursor handed out, ids visible at that moment)
    written: list[StoredEvent] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock, events_per_faction=1_000) as store:

            async def write(faction_id: int) -> None:
                for n in range(15):
                    written.extend(await store.append_events(faction_id, [("t", n), ("t", -n)]))

            async def advance() -> None:
                for _ in range(15):
                    await store.advance_clock(store.cursor() + 3)

            async def watch() -> None:
                last_seen = None
                while True:
                    cursors = {store.cursor()} | {
                        (await store.read_since(f, None))[1] for f in (FACTION, OTHER)
                    }
                    # Recorded only when something changed, so that spinning here stays cheap.
                    seen = (frozenset(cursors), store.statistics().events_in_memory)
                    if seen != last_seen:
                        visible = {event.id for event in (await all_retained(store))}
                        observed.extend((cursor, visible) for cursor in cursors)
                        last_seen = seen
                    # A short sleep rather than a bare checkpoint: a watcher spinning on checkpoints
                    # holds the GIL that every commit's worker thread must take back (up to the 5-ms
                    # switch interval each time), which stretched this test past its timeout.
                    await trio.sleep(WATCH_INTERVAL_S)

            async with trio.open_nursery() as outer:
                outer.start_soon(watch)
                async with trio.open_nursery() as nursery:
                    for faction_id in (FACTION, OTHER, THIRD):
                        nursery.start_soon(write, faction_id)
                    nursery.start_soon(advance)
                outer.cancel_scope.cancel()
    assert len(written) == 90
    assert len({event.timestamp for event in written}) == 90
    assert len(observed) > 30  # the watcher saw the writes land one by one
    for cursor, visible in observed:
        assert all(cursor < event.timestamp for event in written if event.id not in visible)


async def test_a_failed_write_publishes_nothing_and_burns_its_stamps(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            refuse_poison(tmp_path)
            with pytest.raises(StoreError, match="poison refused"):
                await store.append_events(FACTION, [("fine", 1), ("poison", 2)])
            assert (await store.read_since(FACTION, None)) == ([], 0)
            assert query(tmp_path, "SELECT count(*) FROM events") == [(0,)]
            burnt = store.statistics().clock_high_water
            (event,) = await store.append_events(FACTION, [("fine", 3)])
            assert event.timestamp > burnt


async def test_unencodable_data_is_refused_before_anything_is_stamped(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock()) as store:
            with pytest.raises(ValueError, match="JSON"):
                await store.append_events(FACTION, [("t", float("nan"))])
            assert store.statistics().clock_high_water == 0
            assert await store.append_events(FACTION, []) == []


async def test_a_cancelled_append_still_stores_and_publishes_its_events(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            scopes: list[trio.CancelScope] = []

            async def append(faction_id: int, *items: tuple[str, object]) -> None:
                with trio.CancelScope() as scope:
                    scopes.append(scope)
                    await store.append_events(faction_id, items)

            async with trio.open_nursery() as nursery:
                with clock.hold(2):
                    # One append is mid-write in its thread, the other waits for the write limiter.
                    nursery.start_soon(append, FACTION, ("t", 1), ("t", 2))
                    await clock.wait_until_holding()
                    nursery.start_soon(append, OTHER, ("t", 3))
                    await trio.testing.wait_all_tasks_blocked()
                    for scope in scopes:
                        scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    assert (await all_retained(store)) == []
            found = await all_retained(store)
            assert timestamps(found) == [START_MS, START_MS + 1, START_MS + 2]
            assert store.cursor() == START_MS + 2
        async with open_test_store(tmp_path, clock) as store:
            assert (await all_retained(store)) == found


async def test_appends_arriving_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            returned: dict[int, list[StoredEvent]] = {}

            async def append(faction_id: int, *values: int) -> None:
                returned[faction_id] = await store.append_events(faction_id, [("t", v) for v in values])

            async with trio.open_nursery() as nursery:
                with clock.hold(1):
                    nursery.start_soon(append, FACTION, 1)
                    await clock.wait_until_holding()  # the first commit is inside its transaction
                    nursery.start_soon(append, OTHER, 2, 3)
                    nursery.start_soon(append, THIRD, 4)
                    await trio.testing.wait_all_tasks_blocked()
            assert store.statistics().group_commits == 2
            assert [event.data() for event in returned[OTHER]] == [2, 3]
            assert [event.data() for event in returned[THIRD]] == [4]
            for faction_id, events in returned.items():
                assert (await store.read_since(faction_id, None))[0] == events
            # Trio starts tasks in no fixed order, so only the first commit's place is known.
            first, later = timestamps(returned[FACTION]), timestamps(returned[OTHER] + returned[THIRD])
            assert len(set(first + later)) == 4
            assert max(first) < min(later)
            assert timestamps(returned[OTHER]) == sorted(timestamps(returned[OTHER]))
            assert query(tmp_path, "SELECT count(*) FROM events") == [(4,)]


async def test_a_failed_group_commit_fails_every_append_in_it(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            refuse_poison(tmp_path)
            outcomes: dict[int, str] = {}

            async def append(faction_id: int, kind: str) -> None:
                try:
                    await store.append_events(faction_id, [(kind, faction_id)])
                    outcomes[faction_id] = "stored"
                except StoreError as exc:
                    outcomes[faction_id] = str(exc)

            async with trio.open_nursery() as nursery:
                with clock.hold(1):
                    nursery.start_soon(append, FACTION, "fine")
                    await clock.wait_until_holding()
                    nursery.start_soon(append, OTHER, "poison")
                    nursery.start_soon(append, THIRD, "fine")
                    await trio.testing.wait_all_tasks_blocked()
            assert outcomes[FACTION] == "stored"
            assert "poison refused" in outcomes[OTHER]
            assert outcomes[THIRD] == outcomes[OTHER]
            assert [event.faction_id for event in (await all_retained(store))] == [FACTION]
            assert query(tmp_path, "SELECT faction_id FROM events") == [(FACTION,)]


async def test_trim_keeps_the_newest_events_and_ids_are_never_reused(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock(), events_per_faction=2) as store:
            mine = await store.append_events(FACTION, [("t", n) for n in range(5)])
            others = await store.append_events(OTHER, [("t", "x")])
            assert await store.trim() == 3
            assert await store.trim() == 0
            kept = query(tmp_path, "SELECT id FROM events ORDER BY id")
            assert kept == [(mine[3].id,), (mine[4].id,), (others[0].id,)]
            # Delete the newest row too, as an operator might: AUTOINCREMENT still never reuses its id.
            query(tmp_path, f"DELETE FROM events WHERE id = {others[0].id}")
            (fresh,) = await store.append_events(THIRD, [("t", "y")])
            assert fresh.id > others[0].id


async def test_subscriptions_and_their_activity(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            assert store.subscription(FACTION) is None
            assert await store.subscribe(FACTION) == Subscription(FACTION, True, START_MS, START_MS)
            clock.elapse(1_000)
            again = await store.subscribe(FACTION)
            assert (again.subscribed_at, again.last_activity_at) == (START_MS, START_MS + 1_000)
            assert store.subscription(FACTION) == again
            assert store.active_factions() == [FACTION]

            clock.elapse(1_000)
            store.touch(FACTION)
            store.touch(OTHER)  # never subscribed: nothing to record
            assert store.last_activity_at(FACTION) == START_MS + 2_000
            assert store.last_activity_at(OTHER) is None
            clock.elapse(999)
            store.touch(FACTION)  # activity is kept to the second: every poll need not record it
            assert store.last_activity_at(FACTION) == START_MS + 2_000
            activity = "SELECT last_activity_at FROM subscriptions"
            assert query(tmp_path, activity) == [(START_MS + 1_000,)]  # a poll writes nothing...
            await store.flush_activity()
            assert query(tmp_path, activity) == [(START_MS + 2_000,)]  # ...until the flush


async def test_idle_factions_expire_and_revive(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            await store.subscribe(FACTION)
            await store.subscribe(OTHER)
            clock.elapse(60_000)
            store.touch(OTHER)
            assert await store.expire_idle(30_000) == [FACTION]
            assert await store.expire_idle(30_000) == []
            assert store.active_factions() == [OTHER]
            assert store.known_factions() == [OTHER, FACTION]
            rows = "SELECT faction_id, active, last_activity_at FROM subscriptions ORDER BY faction_id"
            assert query(tmp_path, rows) == [(OTHER, 1, START_MS + 60_000), (FACTION, 0, START_MS)]

            clock.elapse(1_000)
            revived = await store.revive(FACTION)
            assert revived == Subscription(FACTION, True, START_MS, START_MS + 61_000)
            assert store.active_factions() == [OTHER, FACTION]
            await store.expire_idle(-1)  # a cutoff in the future: both expire
            clock.elapse(1_000)
            store.touch(OTHER)  # left for the close to flush
        async with open_test_store(tmp_path, clock) as store:
            assert store.active_factions() == []
            assert store.subscription(OTHER) == Subscription(OTHER, False, START_MS, START_MS + 62_000)
            assert store.statistics().factions == 2


TTL_MS = 1_800_000  # retention.subscription_ttl_s's default


async def test_a_wall_clock_stepping_forward_expires_nobody_before_the_ttl_has_passed(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            for faction_id in (FACTION, OTHER):
                await store.subscribe(faction_id)
            clock.now_ms += 3 * DAY_MS  # an NTP step, or an operator's `date -s`
            assert await store.expire_idle(TTL_MS) == []
            clock.elapse(TTL_MS - 1_000)
            store.touch(OTHER)
            assert store.last_activity_at(OTHER) == clock.now_ms  # what /status shows: the wall clock
            assert await store.expire_idle(TTL_MS) == []
            clock.now_ms -= 5 * DAY_MS  # and back, to before the faction subscribed: still measured
            clock.elapse(2_000)
            assert await store.expire_idle(TTL_MS) == [FACTION]
            store.touch(OTHER)  # a second after the last touch, wall clock behind it: still activity
            assert store.last_activity_at(OTHER) == clock.now_ms
            clock.elapse(TTL_MS - 1_000)
            assert await store.expire_idle(TTL_MS) == []
            clock.elapse(1_001)
            assert await store.expire_idle(TTL_MS) == [OTHER]


async def test_a_restart_counts_as_activity_whatever_the_wall_clock_says(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            await store.subscribe(FACTION)
        clock.elapse(2 * DAY_MS)  # stopped for two days, or restarted on a clock two days ahead
        async with open_test_store(tmp_path, clock) as store:
            assert await store.expire_idle(TTL_MS) == []
            clock.elapse(TTL_MS + 1)
            assert await store.expire_idle(TTL_MS) == [FACTION]


async def test_how_long_a_faction_was_quiet_is_measured_on_the_monotonic_clock(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            assert store.quiet_for_ms(FACTION) is None
            clock.now_ms += DAY_MS  # the wall clock a day ahead while events are stamped
            (event,) = await store.append_events(FACTION, [("t", 1)])
            clock.now_ms -= DAY_MS  # corrected: the stamps are now a day ahead of it
            clock.elapse(61_000)
            assert store.quiet_for_ms(FACTION) == 61_000
            (later,) = await store.append_events(FACTION, [("t", 2)])
            assert later.timestamp == event.timestamp + 1  # strictly increasing, by 1 ms an event
            assert store.quiet_for_ms(FACTION) == 0
            clock.elapse(5_000)
        async with open_test_store(tmp_path, clock) as store:
            # Loaded events have no monotonic time, and their stamps are ahead of the wall clock:
            # quiet since the start, at least.
            assert store.quiet_for_ms(FACTION) == 0
            clock.elapse(700_000)
            assert store.quiet_for_ms(FACTION) == 700_000
            clock.now_ms += 3 * DAY_MS  # stepped far ahead at a restart: by the wall clock, then
            assert store.quiet_for_ms(FACTION) == clock.now_ms - later.timestamp


async def test_a_standby_faction_is_known_inactive_and_survives_a_restart(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            await store.subscribe(FACTION)
            assert await store.stand_by(OTHER) == Subscription(OTHER, False, START_MS, START_MS)
            clock.elapse(1_000)
            assert await store.stand_by(FACTION) == Subscription(FACTION, True, START_MS, START_MS)
            assert await store.stand_by(OTHER) == Subscription(OTHER, False, START_MS, START_MS)
            assert store.active_factions() == [FACTION]
            assert await store.expire_idle(-1) == [FACTION]  # a standby faction has nothing to expire
        async with open_test_store(tmp_path, clock) as store:
            assert store.known_factions() == [OTHER, FACTION]
            assert store.active_factions() == []
            revived = await store.revive(OTHER)
            assert revived == Subscription(OTHER, True, START_MS, START_MS + 1_000)


async def test_counts_come_from_the_database(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock(), events_per_faction=1) as store:
            assert await store.counts() == {}
            await store.append_events(FACTION, [("t", 1), ("t", 2)])
            (last,) = await store.append_events(OTHER, [("t", 3)])
            assert await store.counts() == {
                FACTION: FactionCounts(2, START_MS + 1),
                OTHER: FactionCounts(1, last.timestamp),
            }


async def test_check_health_reports_a_broken_database(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock()) as store:
            await store.check_health()
            query(tmp_path, "DROP TABLE relay_clock")
            with pytest.raises(StoreError, match="relay_clock"):
                await store.check_health()


async def test_statistics_snapshot(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, clock) as store:
            await store.subscribe(FACTION)
            await store.subscribe(OTHER)
            await store.expire_idle(-1)  # everything is idle when the cutoff is in the future
            await store.subscribe(FACTION)
            await store.append_events(FACTION, [("t", 1), ("t", 2)])
            stats = store.statistics()
            assert (stats.factions, stats.active_factions) == (2, 1)
            assert (stats.events_in_memory, stats.clock_high_water) == (2, START_MS + 1)


async def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where the folder should be")
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(StoreError, match="cannot open the database"):
        async with open_test_store(tmp_path, WallClock()):
            pass


# --- faction state ---

KEYS = {"war_calls": "id"}


COMMITS = itertools.count()


def war_call(
    kind: str, new: Mapping[str, object], old: Mapping[str, object], committed: str | None = None
) -> tuple[str, dict[str, object]]:
    committed = committed or f"2026-11-24T20:00:{next(COMMITS):06.3f}Z"  # by default, each later
    return (
        "postgres_changes",
        {"table": "war_calls", "eventType": kind, "new": new, "old": old, "commit_timestamp": committed},
    )


def open_state_store(tmp_path: Path, clock: WallClock) -> AbstractAsyncContextManager[Store]:
    return open_store(db_path(tmp_path), now_ms=clock, monotonic_s=clock.monotonic_s, key_columns=KEYS)


async def take_baseline(store: Store, faction_id: int = FACTION, table: str = "war_calls") -> None:
    """The first reconcile of a faction's table, of an empty table: later ones store events."""
    assert await store.reconcile(faction_id, table, [], skip=set(), commit_timestamp="t") == []


async def test_key_only_old_records_are_completed_from_the_stored_row(tmp_path: Path) -> None:
    clock = WallClock()
    call = {"id": 7, "faction_id": FACTION, "target_id": 3001, "caller_name": "Ann"}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await store.append_events(FACTION, [war_call("INSERT", call, {})])
            moved = {**call, "caller_name": "Bob"}
            # Both in one append: the DELETE must see the row as the UPDATE left it.
            update, delete = await store.append_events(
                FACTION, [war_call("UPDATE", moved, {"id": 7}), war_call("DELETE", {}, {"id": 7})]
            )
            assert update.data()["old"] == call
            assert delete.data()["old"] == moved  # today's script reads old.target_id
            assert (await store.faction_state(FACTION)).tables == {"war_calls": []}
            # A full old record (REPLICA IDENTITY FULL) is served as it came.
            await store.append_events(FACTION, [war_call("INSERT", call, {})])
            (full,) = await store.append_events(FACTION, [war_call("DELETE", {}, {**call, "extra": 1})])
            assert full.data()["old"] == {**call, "extra": 1}


async def test_faction_state_survives_a_restart_and_routes_keys_to_factions(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await store.append_events(FACTION, [war_call("INSERT", {"id": 1, "t": "a"}, {})])
            await store.append_events(OTHER, [war_call("INSERT", {"id": 2, "t": "b"}, {})])
            await store.append_events(FACTION, [("hospital_update", {"id": 9})])  # not a row change
            state = await store.faction_state(FACTION)
            assert state.tables == {"war_calls": [{"id": 1, "t": "a"}]}
            assert state.timestamp == store.cursor()
        async with open_state_store(tmp_path, clock) as store:
            assert (await store.faction_state(OTHER)).tables == {"war_calls": [{"id": 2, "t": "b"}]}
            places = [("war_calls", row_key(1)), ("war_calls", row_key(2)), ("war_calls", row_key("1"))]
            # The text "1" is another key than the number 1.
            assert await store.row_owners(places) == {places[0]: FACTION, places[1]: OTHER}
            (delete,) = await store.append_events(OTHER, [war_call("DELETE", {}, {"id": 2})])
            assert delete.data()["old"] == {"id": 2, "t": "b"}
            assert await store.row_owners([("war_calls", row_key(2))]) == {}


async def test_reconcile_emits_the_differences_and_leaves_live_keys_alone(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await take_baseline(store)
            rows = [{"id": n, "v": "old"} for n in (1, 2, 3, 4)]
            await store.append_events(FACTION, [war_call("INSERT", row, {}) for row in rows])
            snapshot = [
                {"id": 2, "v": "new"},
                {"id": 3, "v": "old"},
                {"id": 5, "v": "new"},
                {"id": 6, "v": "x"},
            ]
            events = await store.reconcile(
                FACTION, "war_calls", snapshot, skip={4, 6}, commit_timestamp="2026-11-24T20:00:00.000Z"
            )
            summary = [(e.data()["eventType"], e.data()["new"], e.data()["old"]) for e in events]
            assert summary == [
                ("DELETE", {}, {"id": 1, "v": "old"}),
                ("UPDATE", {"id": 2, "v": "new"}, {"id": 2, "v": "old"}),
                ("INSERT", {"id": 5, "v": "new"}, {}),
            ]
            assert all(e.data()["resync"] is True for e in events)
            # The live INSERT of row 5, committed before the read but delivered after it, adds nothing.
            assert await store.append_events(FACTION, [war_call("INSERT", {"id": 5, "v": "new"}, {})]) == []
            assert {e.data()["commit_timestamp"] for e in events} == {"2026-11-24T20:00:00.000Z"}
            assert (await store.faction_state(FACTION)).tables["war_calls"] == [
                {"id": 2, "v": "new"},
                {"id": 3, "v": "old"},
                {"id": 4, "v": "old"},  # changed live during the read: the live row stands
                {"id": 5, "v": "new"},
            ]
            assert (
                await store.reconcile(
                    FACTION, "war_calls", snapshot[:3] + rows[3:], skip=set(), commit_timestamp="t"
                )
                == []
            )


TWO_TABLES = {"war_calls": "id", "faction_messages": "id"}


async def test_a_tables_first_reconcile_is_its_baseline_rows_without_events(tmp_path: Path) -> None:
    """Supabase Realtime never replays history, and today's script makes an active call of every
    war_calls INSERT and a notification of every message: a faction's history must not arrive as
    hundreds of INSERTs. Its first read is its rows; what differs later is an event."""
    clock = WallClock()
    history = [{"id": n, "v": "old"} for n in range(1, 301)]
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_store(db_path(tmp_path), now_ms=clock, key_columns=TWO_TABLES) as store:
            (live,) = await store.append_events(FACTION, [war_call("INSERT", {"id": 500, "v": "live"}, {})])
            baseline = await store.reconcile(FACTION, "war_calls", history, skip={500}, commit_timestamp="t")
            assert baseline == []
            assert [e.id for e in (await store.read_since(FACTION, None))[0]] == [live.id]
            assert (await store.faction_state(FACTION)).tables["war_calls"] == in_key_order(
                [*history, {"id": 500, "v": "live"}]
            )
            # Per table: another table's first read, or another faction's, is a baseline of its own.
            assert (
                await store.reconcile(
                    FACTION, "faction_messages", [{"id": 1}], skip=set(), commit_timestamp="t"
                )
                == []
            )
            assert (
                await store.reconcile(OTHER, "war_calls", [{"id": 9}], skip=set(), commit_timestamp="t") == []
            )
        async with open_state_store(tmp_path, clock) as store:  # kept across a restart
            later = [*history[1:], {"id": 500, "v": "live"}, {"id": 501, "v": "new"}]
            events = await store.reconcile(FACTION, "war_calls", later, skip=set(), commit_timestamp="t")
            assert [(e.data()["eventType"], e.data()["resync"]) for e in events] == [
                ("DELETE", True),
                ("INSERT", True),
            ]


async def test_a_faction_taken_over_from_another_instance_gets_its_differences_as_events(
    tmp_path: Path,
) -> None:
    """Known on standby, revived by a member's poll (its instance went away): the member holds the
    history and a cursor from there, and must get what changed meanwhile. A subscribe is a baseline."""
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await store.stand_by(OTHER)
            await store.revive(OTHER)
            events = await store.reconcile(OTHER, "war_calls", [{"id": 1}], skip=set(), commit_timestamp="t")
            assert [(e.data()["eventType"], e.data()["resync"]) for e in events] == [("INSERT", True)]
            await store.subscribe(FACTION)
            assert (
                await store.reconcile(FACTION, "war_calls", [{"id": 2}], skip=set(), commit_timestamp="t")
                == []
            )


async def test_a_baseline_cut_short_is_finished_as_a_baseline(tmp_path: Path) -> None:
    """Marked in the transaction of its last chunk: a stop before that leaves the next reconcile to
    go on taking rows without events, never to announce the rest of the history as changes."""
    clock = WallClock()
    snapshot = snapshot_rows(LARGE)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            scope = trio.CancelScope()

            async def reconcile() -> None:
                with scope:
                    await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reconcile)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            chunked = len((await store.faction_state(FACTION)).tables["war_calls"])
            assert chunked < LARGE
            assert query(tmp_path, "SELECT count(*) FROM faction_baselines")[0] == (0,)
            assert (
                await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t") == []
            )
            assert (await store.faction_state(FACTION)).tables["war_calls"] == in_key_order(snapshot)
            assert query(tmp_path, "SELECT count(*) FROM events")[0] == (0,)


async def test_a_reconcile_row_json_cannot_carry_is_left_out_with_a_warning_and_the_rest_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN in an upstream row (REST answers are parsed leniently) made the planner raise in the write
    thread: the committer ended, and the reconcile and every later append waited forever."""
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await take_baseline(store)
            snapshot: list[dict[str, Any]] = [{"id": 1, "v": math.nan}, {"id": 2, "v": 1}]
            events = await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")
            assert [e.data()["new"] for e in events] == [{"id": 2, "v": 1}]
            assert store.statistics().changes_refused == 1
            (warning,) = [r for r in caplog.records if "cannot be stored" in r.getMessage()]
            assert warning.levelname == "WARNING"
            assert warning.getMessage().startswith(f"faction {FACTION}: a change to war_calls")
            (stored,) = await store.append_events(FACTION, [war_call("INSERT", {"id": 3}, {})])
            assert stored.data()["new"] == {"id": 3}
            assert (await store.faction_state(FACTION)).tables["war_calls"] == [{"id": 2, "v": 1}, {"id": 3}]


async def test_a_bug_in_planning_fails_that_commit_and_the_store_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong while a commit is planned, the writers are answered (StoreError) and the
    committer lives on. Here the planner is handed what JSON has no form for (a set: TypeError)."""
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            with pytest.raises(StoreError, match="unexpectedly"):
                await store.reconcile(
                    FACTION, "war_calls", [{"id": 1, "v": {1, 2}}], skip=set(), commit_timestamp="t"
                )
            assert any(r.exc_info for r in caplog.records if "unexpectedly" in r.getMessage())
            assert len(await store.append_events(FACTION, [war_call("INSERT", {"id": 3}, {})])) == 1
            assert (await store.faction_state(FACTION)).tables["war_calls"] == [{"id": 3}]


async def test_missed_since_says_when_older_events_are_gone(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TEST_TIMEOUT_S):
        for _ in range(2):  # and the same after a restart
            async with open_test_store(tmp_path, clock, events_per_faction=2) as store:
                if not (await store.read_since(FACTION, None))[0]:
                    await store.append_events(FACTION, [("t", 1), ("t", 2), ("t", 3)])
                first = query(tmp_path, "SELECT min(timestamp) FROM events")[0][0]
                assert isinstance(first, int)
                assert store.missed_since(FACTION, first - 1)  # the first event is gone
                assert not store.missed_since(FACTION, first)  # everything after it is retained
                assert not store.missed_since(FACTION, None)
                assert not store.missed_since(OTHER, 0)


async def test_a_delete_that_arrives_twice_or_before_an_older_change_wins(tmp_path: Path) -> None:
    """Two sockets (the faction's, the shared DELETE one) do not keep each other's order."""
    clock = WallClock()
    row = {"id": 7, "faction_id": FACTION, "target_id": 3001}

    def at(second: int) -> str:
        return f"2026-11-24T21:00:{second:02d}.000Z"

    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await store.append_events(FACTION, [war_call("INSERT", row, {}, at(1))])
            await store.append_events(FACTION, [war_call("DELETE", {}, {"id": 7}, at(3))])
            late_update = war_call("UPDATE", {**row, "target_id": 9}, {"id": 7}, at(2))
            again = war_call("DELETE", {}, {"id": 7}, at(3))
            assert await store.append_events(FACTION, [late_update, again]) == []
            assert (await store.faction_state(FACTION)).tables["war_calls"] == []
            await store.append_events(FACTION, [war_call("INSERT", row, {}, at(4))])
            assert (await store.faction_state(FACTION)).tables["war_calls"] == [row]
            served = [event.data()["eventType"] for event in (await store.read_since(FACTION, None))[0]]
            assert served == ["INSERT", "DELETE", "INSERT"]


async def test_an_append_from_an_already_cancelled_caller_appends_nothing(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock()) as store:
            with trio.CancelScope() as scope:
                scope.cancel()
                await store.append_events(FACTION, [("t", 1)])
            assert scope.cancelled_caught
            assert (await all_retained(store)) == []


# --- bounded stops: a large reconcile, the close ---

CHUNK = RECONCILE_CHUNK_EVENTS
LARGE = 2 * CHUNK + 500  # three chunks, the last one short


def snapshot_rows(count: int, value: str = "x") -> list[dict[str, object]]:
    return [{"id": n, "v": value} for n in range(count)]


def in_key_order(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return sorted(rows, key=lambda row: row_key(row["id"]))


def stored_counts(tmp_path: Path) -> tuple[object, ...]:
    """Events and rows in the database, and whether the clock covers every stamp."""
    return query(
        tmp_path,
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM faction_rows),"
        " (SELECT high_water FROM relay_clock) >= (SELECT max(timestamp) FROM events)",
    )[0]


async def test_a_cancelled_reconcile_stops_after_the_chunk_being_written(tmp_path: Path) -> None:
    """A stop (shutdown, the connection lost) waits for one chunk of a large reconcile, never for the
    whole of it: the chunk is committed whole and published, and the next reconcile stores the rest."""
    clock = WallClock()
    snapshot = snapshot_rows(LARGE)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await take_baseline(store)
            scope = trio.CancelScope()

            async def reconcile() -> None:
                with scope:
                    await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")

            async with trio.open_nursery() as nursery:
                with clock.hold(1):  # the first stamp of the first chunk, inside its transaction
                    nursery.start_soon(reconcile)
                    await clock.wait_until_holding()
                    scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()  # the caller waits for the chunk
                    assert (await store.faction_state(FACTION)).tables["war_calls"] == []
            assert scope.cancelled_caught
            assert stored_counts(tmp_path) == (CHUNK, CHUNK, 1)
            first = in_key_order(snapshot)[:CHUNK]
            assert (await store.faction_state(FACTION)).tables["war_calls"] == first
            assert store.cursor() == START_MS + CHUNK - 1  # the chunk's last stamp, published
            rest = await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")
            assert len(rest) == LARGE - CHUNK
            assert {event.data()["eventType"] for event in rest} == {"INSERT"}
        async with open_state_store(tmp_path, clock) as store:
            assert (await store.faction_state(FACTION)).tables["war_calls"] == in_key_order(snapshot)
            assert stored_counts(tmp_path) == (LARGE, LARGE, 1)


async def test_a_storage_fault_in_a_later_chunk_keeps_the_chunks_committed(tmp_path: Path) -> None:
    clock = WallClock()
    snapshot = snapshot_rows(LARGE)
    poisoned = sorted(range(LARGE), key=row_key)[CHUNK + 1]  # in the second chunk
    snapshot[poisoned] = {"id": poisoned, "v": "poison"}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await take_baseline(store)
            query(
                tmp_path,
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.data LIKE '%poison%'"
                " BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
            )
            with pytest.raises(StoreError, match="poison refused"):
                await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")
            assert stored_counts(tmp_path) == (CHUNK, CHUNK, 1)
            assert len((await store.faction_state(FACTION)).tables["war_calls"]) == CHUNK
            query(tmp_path, "DROP TRIGGER refuse_poison")
            rest = await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")
            assert len(rest) == LARGE - CHUNK
            assert (await store.faction_state(FACTION)).tables["war_calls"] == in_key_order(snapshot)


async def test_an_append_waits_for_a_whole_reconcile_so_a_later_live_change_stands(tmp_path: Path) -> None:
    """The chunks are a prefix of one diff: no append lands between two of them, where a later chunk,
    planned from the older snapshot, would undo it."""
    clock = WallClock()
    snapshot = snapshot_rows(LARGE)
    last = in_key_order(snapshot)[-1]
    live = war_call("UPDATE", {**last, "v": "live"}, {"id": last["id"]})
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_state_store(tmp_path, clock) as store:
            await take_baseline(store)
            appended: list[StoredEvent] = []

            async def reconcile() -> None:
                await store.reconcile(FACTION, "war_calls", snapshot, skip=set(), commit_timestamp="t")

            async def append() -> None:
                appended.extend(await store.append_events(FACTION, [live]))

            async with trio.open_nursery() as nursery:
                with clock.hold(1):
                    nursery.start_soon(reconcile)
                    await clock.wait_until_holding()
                    nursery.start_soon(append)
                    await trio.testing.wait_all_tasks_blocked()
            assert appended[0].timestamp == store.cursor() == START_MS + LARGE
            assert (await store.faction_state(FACTION)).tables["war_calls"][-1] == {**last, "v": "live"}


async def test_closing_waits_only_briefly_for_a_reader_in_the_database(tmp_path: Path) -> None:
    """An operator's shell with a read open: the close's checkpoint (TRUNCATE waits for readers) gives
    up after CLOSE_BUSY_TIMEOUT_MS rather than BUSY_TIMEOUT_MS, and nothing is lost."""
    bound_s = CLOSE_BUSY_TIMEOUT_MS / 1000 + CLOSE_CHECKPOINT_S + 1.0  # + a thread's scheduling
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_test_store(tmp_path, WallClock()) as store:
            stored = await store.append_events(FACTION, [("t", 1)])
            operator_shell = sqlite3.connect(db_path(tmp_path), isolation_level=None)
            operator_shell.execute("BEGIN")
            operator_shell.execute("SELECT count(*) FROM events").fetchall()  # a read, kept open
            closing_at = trio.current_time()
        closed_in = trio.current_time() - closing_at
        operator_shell.close()
        assert closed_in < bound_s
        async with open_test_store(tmp_path, WallClock()) as store:
            assert (await store.read_since(FACTION, None))[0] == stored
