"""Wake-ups after commit: who is waiting for a faction's next event, and the relay-wide `stopping` flag.

The hub stores nothing; the store has already committed and published an event before `notify`
is called, so a woken waiter always finds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class HubStatistics:
    factions_waited_on: int
    stopping: bool


class Hub:
    def __init__(self) -> None:
        self.stopping = trio.Event()
        self._new_events: dict[int, trio.Event] = {}

    def notify(self, faction_id: int) -> None:
        """Wake everyone waiting on the faction; call only after its events are visible."""
        event = self._new_events.pop(faction_id, None)
        if event is not None:
            event.set()

    async def wait_for_events(self, faction_id: int) -> None:
        """Return at the faction's next `notify`, or at once when the relay is stopping.

        One shared Event per faction, replaced on each notify, so a thousand waiters cost one
        object and one wake-up pass rather than one per waiter.
        """
        if self.stopping.is_set():
            return
        await self._new_events.setdefault(faction_id, trio.Event()).wait()

    def begin_stopping(self) -> None:
        """Shutdown has started: every held request returns now, and new ones do not wait."""
        self.stopping.set()
        for event in self._new_events.values():
            event.set()
        self._new_events.clear()

    def statistics(self) -> HubStatistics:
        return HubStatistics(factions_waited_on=len(self._new_events), stopping=self.stopping.is_set())
