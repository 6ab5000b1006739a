"""Routing the relay-wide DELETE subscription to factions by key.

Under Postgres's default replica identity a DELETE carries only its row's key, so it never matches a
`faction_id=eq.F` filter (protocol reference 6.2, 7). One unfiltered DELETE channel per table, on one
socket for the whole relay, receives them all instead, and the stored faction rows say whose row
each one was. That costs one socket and one message per DELETE in the table, not one per faction.

Two sockets do not keep each other's order: a DELETE can arrive before the INSERT of its row (a call
made and cancelled within a moment). A DELETE nobody holds is therefore parked for PARK_S; when a
faction stores that row meanwhile, the DELETE follows it. After that it is dropped: the row is
another relay's, or was never ours. The periodic reconcile is the backstop for anything lost here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import trio

from relay.config import ChannelConfig
from relay.storage.state import RowKey, row_key
from relay.upstream.phoenix import ChangeReceived, split_conditions

log = logging.getLogger(__name__)

PARK_S = 5.0
PARKED_MAX = 10_000  # a flood of foreign DELETEs costs bounded memory

# (table, key) pairs -> the faction holding each row, for those some faction holds.
Owners = Callable[[Sequence[tuple[str, RowKey]]], Awaitable[Mapping[tuple[str, RowKey], int]]]
Deliver = Callable[[int, Sequence[ChangeReceived]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    routed: int  # DELETEs handed to the faction holding their row, at once or after parking
    parked: int  # waiting now for their row's INSERT
    dropped: int  # parked until PARK_S and nobody stored the row (or pushed out by PARKED_MAX)


def filter_columns(channels: Iterable[ChannelConfig]) -> dict[str, frozenset[str]]:
    """The columns each table's faction channel filters on (`faction_id` of `faction_id=eq.{...}`)."""
    return {
        channel.table: frozenset(
            condition.partition("=")[0].strip() for condition in split_conditions(channel.filter)
        )
        for channel in channels
    }


class DeleteRouter:
    def __init__(
        self,
        key_columns: Mapping[str, str],
        owners: Owners,
        deliver: Deliver,
        *,
        filter_columns: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self._keys = dict(key_columns)
        # A DELETE whose old record holds every column the faction channels filter on (REPLICA
        # IDENTITY FULL) reaches its faction's own channel, in order with that row's other changes.
        self._filter_columns = dict(filter_columns or {})
        self._owners = owners
        self._deliver = deliver
        self._parked: OrderedDict[tuple[str, RowKey], tuple[float, ChangeReceived]] = OrderedDict()
        self._routed = 0
        self._dropped = 0

    async def route(self, changes: Sequence[ChangeReceived]) -> None:
        """Hand each DELETE to the faction holding its row, or park it."""
        routed: dict[int, list[ChangeReceived]] = {}
        now = trio.current_time()
        self._expire(now)
        routable = []
        for change in changes:
            key = self._key(change.table, change.data.get("old"))
            filtered_on = self._filter_columns.get(change.table)
            if key is None or (filtered_on and filtered_on <= change.data["old"].keys()):
                continue
            routable.append(((change.table, key), change))
        owners = await self._owners([place for place, _ in routable])
        for (table, key), change in routable:
            owner = owners.get((table, key))
            if owner is None:
                self._parked[(table, key)] = (now + PARK_S, change)
                while len(self._parked) > PARKED_MAX:
                    self._parked.popitem(last=False)
                    self._dropped += 1
                continue
            routed.setdefault(owner, []).append(change)
        for faction_id, faction_changes in routed.items():
            self._routed += len(faction_changes)
            await self._deliver(faction_id, faction_changes)

    async def stored(self, faction_id: int, changes: Sequence[ChangeReceived]) -> None:
        """A faction stored these changes: a parked DELETE of one of their rows follows now."""
        if not self._parked:
            return
        follow = []
        for change in changes:
            key = self._key(change.table, change.data.get("new"))
            parked = self._parked.pop((change.table, key), None) if key is not None else None
            if parked is not None:
                follow.append(parked[1])
        if follow:
            self._routed += len(follow)
            await self._deliver(faction_id, follow)

    def _key(self, table: str, row: object) -> RowKey | None:
        column = self._keys.get(table)
        if column is None or not isinstance(row, dict) or column not in row:
            return None
        return row_key(row[column])

    def _expire(self, now: float) -> None:
        while self._parked:
            (_, (deadline, _)) = next(iter(self._parked.items()))
            if deadline > now:
                return
            self._parked.popitem(last=False)
            self._dropped += 1

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(self._routed, len(self._parked), self._dropped)
