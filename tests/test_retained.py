"""Which events the store keeps, and which of them it holds in memory (`relay/storage/retained.py`):
bounded by count and by bytes per faction, memory bounded per faction and in all, the rest read from
the database a page at a time, the same after a restart, and each event's data held once."""

from __future__ import annotations

import gc
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from relay.config import RetentionConfig
from relay.storage.retained import event_size
from relay.storage.store import Store, StoredEvent, open_store

pytestmark = pytest.mark.unit

KIB = 1024
# The smallest sizes the config allows, so that a handful of 4 KB events reaches every limit.
SMALL = RetentionConfig(
    events_per_faction=100,
    bytes_per_faction=64 * KIB,
    memory_bytes_per_faction=16 * KIB,
    memory_bytes=40 * KIB,
)
BLOB = 4_000


@asynccontextmanager
async def small_store(tmp_path: Path, retention: RetentionConfig = SMALL) -> AsyncIterator[Store]:
    async with open_store(tmp_path / "relay.db", retention=retention) as store:
        yield store


async def publish(store: Store, faction_id: int, count: int, size: int = BLOB) -> list[StoredEvent]:
    stored = []
    for n in range(count):
        stored += await store.append_events(faction_id, [("hospital_update", {"n": n, "blob": "x" * size})])
    return stored


async def read_all(store: Store, faction_id: int, since: int | None) -> list[list[StoredEvent]]:
    """Every page a member polling from `since` is answered, until it is caught up."""
    pages: list[list[StoredEvent]] = []
    while True:
        found, cursor = await store.read_since(faction_id, since)
        if not found:
            return pages
        pages.append(found)
        since = cursor


def size_of(events: list[StoredEvent]) -> int:
    return sum(event.size for event in events)


async def test_a_faction_keeps_its_newest_events_by_bytes_when_they_bind_before_the_count(
    tmp_path: Path,
) -> None:
    async with small_store(tmp_path) as store:
        stored = await publish(store, 1, 30)
        per_event = stored[0].size
        kept = SMALL.bytes_per_faction // per_event
        assert store.kept_count(1) == kept < 30
        pages = await read_all(store, 1, None)
        assert [event for page in pages for event in page] == stored[-kept:]
        assert store.missed_since(1, stored[-kept - 1].timestamp - 1)
        assert not store.missed_since(1, stored[-kept - 1].timestamp)


async def test_the_newest_event_is_kept_even_when_it_alone_is_over_every_limit(tmp_path: Path) -> None:
    async with small_store(tmp_path) as store:
        await publish(store, 1, 3)
        (huge,) = await publish(store, 1, 1, size=100 * KIB)
        assert store.kept_count(1) == 1
        assert await store.read_since(1, None) == ([huge], huge.timestamp)


async def test_a_cursor_older_than_memory_is_served_from_the_database_a_page_at_a_time(
    tmp_path: Path,
) -> None:
    async with small_store(tmp_path) as store:
        stored = await publish(store, 1, 12)
        assert store.statistics().events_memory_bytes <= SMALL.memory_bytes_per_faction
        pages = await read_all(store, 1, stored[0].timestamp - 1)
        assert [event for page in pages for event in page] == stored
        assert len(pages) > 1
        for page in pages:
            assert size_of(page) <= SMALL.memory_bytes_per_faction
        # The newest page is the one in memory, identical objects to what the commit published.
        assert pages[-1][-1] is stored[-1]


async def test_all_factions_together_hold_at_most_memory_bytes_the_oldest_leaving_first(
    tmp_path: Path,
) -> None:
    async with small_store(tmp_path) as store:
        published = {faction_id: await publish(store, faction_id, 3) for faction_id in range(1, 7)}
        stats = store.statistics()
        assert stats.events_memory_bytes <= SMALL.memory_bytes
        assert stats.events_in_memory == SMALL.memory_bytes // published[1][0].size
        # The first factions' events went to the database; every faction still gets all it keeps.
        for faction_id, events in published.items():
            assert [event for page in await read_all(store, faction_id, None) for event in page] == events


async def test_a_restart_holds_the_newest_in_memory_and_serves_the_same_events(tmp_path: Path) -> None:
    async with small_store(tmp_path) as store:
        for faction_id in (1, 2, 3):
            await publish(store, faction_id, 20)
        before = {faction_id: await read_all(store, faction_id, None) for faction_id in (1, 2, 3)}
        stats_before = store.statistics()
    async with small_store(tmp_path) as store:
        stats = store.statistics()
        assert stats.events_memory_bytes <= SMALL.memory_bytes
        assert stats.events_in_memory == stats_before.events_in_memory
        for faction_id in (1, 2, 3):
            assert await read_all(store, faction_id, None) == before[faction_id]
            assert store.missed_since(faction_id, 0)


async def test_a_restart_with_limits_lowered_keeps_only_what_the_new_limits_allow(tmp_path: Path) -> None:
    async with small_store(tmp_path, RetentionConfig()) as store:
        stored = await publish(store, 1, 30)
    async with small_store(tmp_path) as store:
        kept = SMALL.bytes_per_faction // stored[0].size
        assert store.kept_count(1) == kept
        assert [e for page in await read_all(store, 1, None) for e in page] == stored[-kept:]


async def test_the_trim_deletes_what_is_no_longer_kept_by_size_too(tmp_path: Path) -> None:
    async with small_store(tmp_path) as store:
        await publish(store, 1, 30)
        await publish(store, 2, 2)
        kept = store.kept_count(1)
        assert await store.trim() == 30 - kept
        assert await store.trim() == 0
    with sqlite3.connect(tmp_path / "relay.db") as conn:
        counts = dict(conn.execute("SELECT faction_id, count(*) FROM events GROUP BY faction_id").fetchall())
    assert counts == {1: kept, 2: 2}


async def test_an_events_data_is_held_once(tmp_path: Path) -> None:
    """The served text holds the data; nothing else keeps a copy (it was held twice: 7.7 GB)."""
    retention = RetentionConfig(memory_bytes=64 * 1024 * 1024, memory_bytes_per_faction=64 * 1024 * 1024)
    async with small_store(tmp_path, retention) as store:
        await publish(store, 1, 1)  # warm up: the first append allocates what stays anyway
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            stored = await publish(store, 1, 40, size=50_000)
            del stored
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        data = 40 * 50_000
        assert data <= grown < data * 1.2
        assert store.statistics().events_memory_bytes == 41 * event_size(len("hospital_update"), 0) + sum(
            len(event.data_json) for event in (await store.read_since(1, None))[0]
        )


async def test_members_far_behind_asking_the_same_question_cost_one_database_read(tmp_path: Path) -> None:
    """A thousand streams resuming from one cursor after a burst: one read answers them all."""
    async with small_store(tmp_path) as store:
        stored = await publish(store, 1, 12)
        since = stored[0].timestamp - 1
        answers: list[list[StoredEvent]] = []

        async def member() -> None:
            answers.append((await store.read_since(1, since))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(1_000):
                nursery.start_soon(member)
        assert store.statistics().database_pages_read == 1
        assert all(answer == answers[0] for answer in answers)
        assert answers[0][0] == stored[0]
