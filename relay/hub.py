"""Wake-ups after commit: who is waiting for a faction's next event, and the relay-wide `stopping` flag.

The hub stores nothing; the store has already committed and published an event before `notify`
is called, so a woken waiter always finds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class HubStatistics:
    factions_waited_on: int
    stopping: bool


class Hub:
    def __init__(self) -> None:
        self.stopping = trio.Event()
        # Per faction, the tasks parked until its next notify. Parked by hand (trio.lowlevel) rather
        # than on an Event: a waiter is then one set entry, without the Event.wait and
        # ParkingLot.park frames that each of thousands of held requests kept alive.
        self._waiting: dict[int, set[trio.lowlevel.Task]] = {}
        self._notified_at: dict[int, float] = {}  # trio clock

    def notify(self, faction_id: int) -> None:
        """Wake everyone waiting on the faction; call only after its events are visible."""
        self._notified_at[faction_id] = trio.current_time()
        self._wake(faction_id)

    def _wake(self, faction_id: int) -> None:
        for task in self._waiting.pop(faction_id, ()):
            trio.lowlevel.reschedule(task)

    def wake_quiet_factions(self, quiet_for_s: float) -> None:
        """Wake the waiters of every faction with no notify for `quiet_for_s`: they find nothing new,
        and a held stream can then say something to keep its connection open."""
        now = trio.current_time()
        for faction_id in list(self._waiting):
            if now - self._notified_at.get(faction_id, -math.inf) >= quiet_for_s:
                self._wake(faction_id)

    async def wake_quiet_factions_every(self, interval_s: float) -> None:
        """One timer for every held stream, instead of one per stream: a held request's memory is
        mostly its tasks and scopes, and there are thousands of them."""
        while True:
            await trio.sleep(interval_s)
            self.wake_quiet_factions(interval_s)

    async def wait_for_notify(self, faction_id: int) -> None:
        """Return at the faction's next `notify` (or wake-up when quiet), or at once when the relay is
        stopping."""
        if self.stopping.is_set():
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        waiting = self._waiting.setdefault(faction_id, set())
        waiting.add(task)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Only reached while still parked, so `waiting` is still this faction's set.
            waiting.discard(task)
            if not waiting and self._waiting.get(faction_id) is waiting:
                del self._waiting[faction_id]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def begin_stopping(self) -> None:
        """Shutdown has started: every held request returns now, and new ones do not wait."""
        self.stopping.set()
        for faction_id in list(self._waiting):
            self._wake(faction_id)

    def statistics(self) -> HubStatistics:
        return HubStatistics(factions_waited_on=len(self._waiting), stopping=self.stopping.is_set())
