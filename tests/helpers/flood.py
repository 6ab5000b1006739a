"""Floods for the tests: rows numbered by the change that wrote them, and a sink that can be held up
like a store busy with a long commit (virtual time: no worker thread, so the autojump clock is safe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from relay.service import RunningRelay
from relay.traffic import Source
from relay.upstream.phoenix import ChangeReceived
from tests.helpers.factions import FACTION, call


def numbered_calls(faction_id: int, keys: int, first_key: int = 1) -> Callable[[int], dict[str, Any]]:
    """Change `n` writes row `first_key + n % keys`, its caller_name saying `n`: an INSERT the first
    time a key comes round, an UPDATE after, and every change differs from the row it replaces."""

    def row_at(n: int) -> dict[str, Any]:
        return {**call(faction_id, first_key + n % keys), "caller_name": f"n{n}"}

    return row_at


def stored(running: RunningRelay, source: Source, faction_id: int = FACTION) -> int:
    """How many of the faction's changes from `source` the relay has stored."""
    flow = running.services.traffic.statistics(trio.current_time()).get(faction_id)
    return 0 if flow is None else flow.stored[source]


def change_number(change: dict[str, Any]) -> int:
    """The `n` of a change (`new` in the relay's realtime-js shape) that `numbered_calls` wrote."""
    return int(change["new"]["caller_name"][1:])


@dataclass
class HeldSink:
    """The supervisors' sink, which waits at `open` before taking each batch while it is unset."""

    open: trio.Event = field(default_factory=trio.Event)
    batches: list[list[ChangeReceived]] = field(default_factory=list)
    entered: int = 0  # batches that reached the sink, taken or waiting

    async def ingest(self, faction_id: int, changes: Sequence[ChangeReceived]) -> None:
        del faction_id
        self.entered += 1
        await self.open.wait()
        self.batches.append(list(changes))

    def taken(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def numbers(self) -> list[int]:
        return [change_number(change.data) for batch in self.batches for change in batch]
