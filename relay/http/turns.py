"""Turns for making poll answers while the relay is over its capacity: at most `limit` at once, the
rest waiting in arrival order.

Why: trio runs every task that is ready once per pass of its scheduler, so when the relay has more
members than CPU, each pass grows with them. At twice its long-poll capacity a pass took a second,
and the upstream readers, storing and `/ping` waited that long for each of their steps: `/ping` took
1.5-3 s and changes 3 s to be stored (bench/RESULTS-capacity.md). With turns, members over capacity
wait in line, parked, instead of all being ready at once: passes stay short, so everything else still
runs, and an answer made later carries every event that arrived meanwhile (the cursor protocol): the
load is shed by coalescing, never by dropping or refusing anyone.

Turns are taken only while the loop lags (`watch_lag`): within capacity each turn taken is one more
pass before an answer, which cost a fifth of the members held at p99 <= 1 s. A held long-poll gives
its turn back while it waits for events (`Turn.paused`), and takes one again to answer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

# Where the hot path hands a poll its turn: the scope's ASGI extensions (the events endpoint pauses it
# while the poll is held).
TURN_EXTENSION = "cat_relay.turn"
# Answers being made at once while the loop lags: a poll's own work is ~0.3 ms of CPU over a few
# passes, so 64 of them keep a pass to a few tens of milliseconds. Measured at 1x and 2x capacity
# (bench/RESULTS-capacity.md).
ANSWERS_AT_ONCE = 64
# The loop lags when a timer fires this late: a pass of the scheduler taking that long. Within
# capacity on a small VM a pass stays under ~30 ms (a garbage collection ~100 ms, once); over it,
# without turns, passes grow to seconds.
LAG_CHECK_EVERY_S = 0.05
ENGAGE_AT_LAG_S = 0.15
LATE_CHECKS = 3
RELEASE_AFTER_S = 5.0


class Turns:
    def __init__(self, limit: int = ANSWERS_AT_ONCE) -> None:
        self._limiter = trio.CapacityLimiter(limit)
        self.engaged = False
        self.engagements = 0  # times the loop lagged and turns were taken
        self.waited = 0  # turns that had to be waited for

    @property
    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting

    def turn(self) -> Turn:
        """`async with turns.turn() as turn:` one request's turn, taken on entering."""
        return Turn(self)

    async def watch_lag(self) -> None:
        """Engage the turns once timers fire late `LATE_CHECKS` times in a row (passes of the
        scheduler that long, not one garbage collection); release them once nobody has had to wait
        for a turn for `RELEASE_AFTER_S`. (While engaged the loop keeps time, so lag cannot say when
        they are no longer needed; an empty line can.)"""
        late = 0
        needed_at = -math.inf
        while True:
            due = trio.current_time() + LAG_CHECK_EVERY_S
            await trio.sleep_until(due)
            now = trio.current_time()
            if self.engaged:
                if self.waiting:
                    needed_at = now
                elif now - needed_at >= RELEASE_AFTER_S:
                    self.engaged = False
                continue
            late = late + 1 if now - due >= ENGAGE_AT_LAG_S else 0
            if late >= LATE_CHECKS:
                self.engaged, needed_at, late = True, now, 0
                self.engagements += 1

    async def _take(self) -> bool:
        """Whether a turn was taken (only while engaged)."""
        if not self.engaged:
            return False
        if not self._limiter.available_tokens:
            self.waited += 1
        # With its checkpoint, also when a turn is free: measured, the pass this adds is what keeps
        # the turns in use (a turn taken without it was given back before others needed one).
        await self._limiter.acquire()
        return True


class Turn:
    """One request's turn: held from `async with` on, given back on leaving or while `paused`."""

    __slots__ = ("_held", "_turns")

    def __init__(self, turns: Turns) -> None:
        self._turns = turns
        self._held = False

    async def __aenter__(self) -> Turn:
        self._held = await self._turns._take()
        return self

    async def __aexit__(self, *_: object) -> None:
        self._give_back()

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Give the turn back for the `with` (a held long-poll waiting for events), then take
        another. Cancelled while waiting for it, the request leaves without one."""
        self._give_back()
        try:
            yield
        finally:
            self._held = await self._turns._take()

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._turns._limiter.release()
