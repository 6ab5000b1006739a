"""When the relay collects its young garbage: as soon as the process grows."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from relay.memory import COLLECT_EVERY_S, GROWTH_BYTES, YoungGarbage

MIB = 1024 * 1024


class Buffer:
    """A large buffer held by a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.data = bytearray(MIB)
        self.me = self


def cycle_holding_a_buffer() -> weakref.ref[Buffer]:
    return weakref.ref(Buffer())


class Rss:
    def __init__(self, readable: bool = True) -> None:
        self.now = 100 * MIB
        self.readable = readable

    def __call__(self) -> int | None:
        return self.now if self.readable else None


async def past_first_look(rss: Rss) -> YoungGarbage:
    """A YoungGarbage after its first look, which collects and takes the baseline."""
    garbage = YoungGarbage(rss)
    await garbage.look()
    assert garbage.collections == 1
    return garbage


@pytest.fixture
def only_our_collections() -> Iterator[None]:
    """The collector's own thresholds off, so that a cycle is freed by `look` or not at all."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def looks(garbage: YoungGarbage, count: int) -> None:
    for _ in range(count):
        await trio.sleep(COLLECT_EVERY_S)
        await garbage.look()


@pytest.mark.virtual_time
async def test_a_process_that_does_not_grow_is_not_collected(
    autojump_clock: trio.testing.MockClock, only_our_collections: None
) -> None:
    garbage = await past_first_look(Rss())
    held = cycle_holding_a_buffer()
    await looks(garbage, 100)
    assert garbage.collections == 1
    assert held() is not None  # left to the collector's own thresholds: not worth a walk of the young objects
    gc.collect()


@pytest.mark.virtual_time
async def test_growth_is_collected_at_the_next_look_and_measured_from_the_lowest_point(
    autojump_clock: trio.testing.MockClock, only_our_collections: None
) -> None:
    rss = Rss()
    garbage = await past_first_look(rss)
    rss.now -= 3 * MIB  # memory given back: the growth counts from here
    await looks(garbage, 1)
    rss.now += GROWTH_BYTES - 1
    await looks(garbage, 1)
    assert garbage.collections == 1
    held = cycle_holding_a_buffer()
    rss.now += 1
    await looks(garbage, 1)
    assert garbage.collections == 2
    assert held() is None


@pytest.mark.virtual_time
async def test_where_the_rss_cannot_be_read_every_look_collects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    garbage = YoungGarbage(Rss(readable=False))
    await looks(garbage, 3)
    assert garbage.collections == 3


# Run in a fresh interpreter: a process whose allocator has had its own way first (pytest's, after other
# tests) may hold freed heap pages large enough to serve the block without touching a new page.
RSS_PREMISE = """
from relay.memory import resident_bytes, return_large_blocks_to_the_system
assert return_large_blocks_to_the_system()
for _ in range(3):  # large blocks made and freed, as the relay makes them
    block = b"y" * (16 * 1024 * 1024)
    del block
before = resident_bytes()
block = b"x" * (8 * 1024 * 1024)
print(resident_bytes() - before)
"""


@pytest.mark.e2e
def test_a_large_buffer_shows_in_the_rss_at_once() -> None:
    """What the trigger relies on: with the allocator set as `relay serve` sets it at start, a large
    block is pages of its own, counted as soon as it is written, however many came and went before."""
    grown = subprocess.run(
        [sys.executable, "-c", RSS_PREMISE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert int(grown) >= 7 * MIB
