"""Waiting for a condition the relay shows only in its `statistics()` snapshots."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


async def eventually(condition: Callable[[], object], step_s: float = 0.01) -> None:
    """Wait until `condition()` holds.

    The relay shows its state as `statistics()` snapshots rather than events to wait on (as Trio's own
    objects do), so tests look again every `step_s`: free in virtual time, and a bounded, small cost
    under the real clock, where every caller is inside `fail_after`.
    """
    while not condition():  # noqa: ASYNC110 - there is no event to wait on, by design (see above)
        await trio.sleep(step_s)


async def eventually_async(
    step: Callable[[], Awaitable[object]], condition: Callable[[], object], pause_s: float = 0.02
) -> None:
    """Run `step` (a poll, say) until `condition()` holds; callers bound it with `fail_after`."""
    while True:
        await step()
        if condition():
            return
        await trio.sleep(pause_s)


async def eventually_holds(condition: Callable[[], Awaitable[object]], step_s: float = 0.01) -> None:
    """`eventually` for a condition that must await what it looks at (the store's faction state, read
    from the database)."""
    while not await condition():  # noqa: ASYNC110 - as in `eventually`
        await trio.sleep(step_s)
