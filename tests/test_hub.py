"""Wake-ups after commit, and the stopping flag that releases every held request."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.hub import Hub


@pytest.mark.unit
async def test_notify_wakes_every_waiter_of_that_faction_only() -> None:
    hub = Hub()
    woken: list[str] = []

    async def wait(name: str, faction_id: int) -> None:
        await hub.wait_for_notify(faction_id)
        woken.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "a", 1)
            nursery.start_soon(wait, "b", 1)
            nursery.start_soon(wait, "other", 2)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.statistics().factions_waited_on == 2
            hub.notify(1)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(woken) == ["a", "b"]
            hub.notify(2)
    assert sorted(woken) == ["a", "b", "other"]


@pytest.mark.virtual_time
async def test_a_waiter_arriving_after_a_notify_waits_for_the_next_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = Hub()
    hub.notify(1)
    with trio.move_on_after(1) as scope:
        await hub.wait_for_notify(1)
    assert scope.cancelled_caught
    assert hub.statistics().factions_waited_on == 0  # a waiter given up on is not left behind


@pytest.mark.unit
async def test_stopping_releases_waiters_and_later_ones_return_at_once() -> None:
    hub = Hub()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.wait_for_notify, 1)
            nursery.start_soon(hub.wait_for_notify, 2)
            await trio.testing.wait_all_tasks_blocked()
            hub.begin_stopping()
        await hub.wait_for_notify(3)
    assert hub.statistics().stopping


@pytest.mark.virtual_time
async def test_the_timer_wakes_only_factions_quiet_for_a_whole_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = Hub()
    woken: list[tuple[int, float]] = []

    async def wait(faction_id: int) -> None:
        while True:
            await hub.wait_for_notify(faction_id)
            woken.append((faction_id, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.wake_quiet_factions_every, 15.0)
        nursery.start_soon(wait, 1)
        nursery.start_soon(wait, 2)
        await trio.sleep(10)
        hub.notify(2)  # faction 2 had an event at 10 s: not quiet at the tick at 15 s
        await trio.sleep(21)
        nursery.cancel_scope.cancel()
    assert sorted(woken, key=lambda wake: (wake[1], wake[0])) == [(2, 10.0), (1, 15.0), (1, 30.0), (2, 30.0)]
