"""Turns for poll answers while the loop lags (relay.http.turns), on virtual time: no threads."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.http.turns import (
    ENGAGE_AT_LAG_S,
    LAG_CHECK_EVERY_S,
    LATE_CHECKS,
    RELEASE_AFTER_S,
    Turns,
)

pytestmark = pytest.mark.virtual_time


async def make_the_loop_lag(clock: trio.testing.MockClock) -> None:
    """Passes of the scheduler as long as a busy relay's: the clock moves while nothing runs."""
    for _ in range(LATE_CHECKS):
        await trio.sleep(LAG_CHECK_EVERY_S / 2)  # the watcher is asleep, its timer due
        clock.jump(LAG_CHECK_EVERY_S + ENGAGE_AT_LAG_S)
    await trio.testing.wait_all_tasks_blocked()


async def test_within_capacity_every_poll_has_its_turn_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns(limit=2)
    inside = 0
    most = 0
    release = trio.Event()

    async def poll() -> None:
        nonlocal inside, most
        async with turns.turn():
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(turns.watch_lag)
        for _ in range(10):
            nursery.start_soon(poll)
        await trio.testing.wait_all_tasks_blocked()
        assert (most, turns.waited) == (10, 0)
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_lagging_loop_puts_polls_in_line_and_a_held_poll_gives_its_turn_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns(limit=2)
    order: list[str] = []
    done = {name: trio.Event() for name in ("held", "a", "b", "c")}
    events = trio.Event()

    async def poll(name: str, held: bool) -> None:
        async with turns.turn() as turn:
            if held:
                async with turn.paused():  # waiting for events holds no turn
                    await events.wait()
            order.append(name)
            await done[name].wait()

    turns.engaged = True  # as `watch_lag` leaves it (the tests below): no timer, so no release meanwhile
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, "held", True)
        await trio.testing.wait_all_tasks_blocked()
        for name in ("a", "b", "c"):
            nursery.start_soon(poll, name, False)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"]  # two turns, and the held poll has none
        events.set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"]  # in line behind c, which came first
        assert turns.waiting == 2
        done["a"].set()  # one turn free: the first in line has it
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c"]
        done["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c", "held"]
        assert turns.waited == 2
        nursery.cancel_scope.cancel()


async def test_the_turns_are_released_once_nobody_waited_for_one_for_a_while(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns(limit=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(turns.watch_lag)
        await make_the_loop_lag(autojump_clock)
        assert turns.engaged
        assert turns.engagements == 1
        await trio.sleep(RELEASE_AFTER_S / 2)
        assert turns.engaged
        await trio.sleep(RELEASE_AFTER_S)
        assert not turns.engaged
        nursery.cancel_scope.cancel()


async def test_one_late_timer_is_not_a_lagging_loop(autojump_clock: trio.testing.MockClock) -> None:
    turns = Turns(limit=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(turns.watch_lag)
        await trio.sleep(LAG_CHECK_EVERY_S / 2)
        autojump_clock.jump(1.0)  # a long garbage collection, once
        await trio.sleep(10 * LAG_CHECK_EVERY_S)
        assert not turns.engaged
        nursery.cancel_scope.cancel()
