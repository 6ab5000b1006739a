"""What flows through the relay per faction, counted in memory for `/status`, the status page and
`/metrics`: events stored (by where they came from) and served, a per-minute event rate, when the
upstream last sent a change, and who is listening (members).

Counting is a few dictionary operations on paths that run per request, so nothing here allocates
per event or touches the clock on its own: callers pass the trio time they already have.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

# The status page's sparkline: events per minute over the last half hour.
RATE_MINUTES = 30
# A member is an address that asked about the faction within this window, or holds a stream open.
# Today's script polls every 3 s, client.js at most every 10 s when idle.
MEMBER_WINDOW_S = 60.0
# Addresses seen are pruned when their number doubles, so a faction polled from many addresses
# (a member's phone moving between networks) costs memory in proportion to its recent audience.
MIN_PRUNE_AT = 64


class Source(StrEnum):
    UPSTREAM = "upstream"  # a change on the faction's socket (or routed to it by key)
    RECONCILE = "reconcile"  # a difference a REST read found: the resync events
    PUBLISHED = "published"  # posted by members' scripts


@dataclass(frozen=True, slots=True)
class FactionTrafficStatistics:
    stored: dict[Source, int]
    served: int
    events_per_minute: list[int]  # oldest first; the last is the current minute
    members: int
    last_upstream_change_at: float | None  # trio clock


class _Faction:
    __slots__ = (
        "last_upstream_change_at",
        "minute",
        "per_minute",
        "prune_at",
        "seen",
        "served",
        "stored",
        "streams",
    )

    def __init__(self, minute: int) -> None:
        self.stored = dict.fromkeys(Source, 0)
        self.served = 0
        self.per_minute: deque[int] = deque([0] * RATE_MINUTES, maxlen=RATE_MINUTES)
        self.minute = minute
        self.seen: dict[str, float] = {}  # address -> trio time of its last request
        self.streams: dict[str, int] = {}  # address -> streams it holds open
        self.prune_at = MIN_PRUNE_AT
        self.last_upstream_change_at: float | None = None

    def advance_to(self, minute: int) -> None:
        gap = minute - self.minute
        if gap > 0:
            self.per_minute.extend([0] * min(gap, RATE_MINUTES))
            self.minute = minute

    def prune(self, now: float) -> None:
        cutoff = now - MEMBER_WINDOW_S
        self.seen = {address: at for address, at in self.seen.items() if at >= cutoff}
        self.prune_at = max(MIN_PRUNE_AT, 2 * len(self.seen))


class Traffic:
    def __init__(self) -> None:
        self._factions: dict[int, _Faction] = {}

    def _faction(self, faction_id: int, now: float) -> _Faction:
        faction = self._factions.get(faction_id)
        if faction is None:
            faction = self._factions[faction_id] = _Faction(_minute(now))
        return faction

    def stored(self, faction_id: int, source: Source, count: int, now: float) -> None:
        """`count` events of the faction were committed and are visible."""
        faction = self._faction(faction_id, now)
        faction.stored[source] += count
        faction.advance_to(_minute(now))
        faction.per_minute[-1] += count

    def upstream_changed(self, faction_id: int, now: float) -> None:
        """The faction's upstream sent changes (stored or not): it is alive and talking."""
        self._faction(faction_id, now).last_upstream_change_at = now

    def served(self, faction_id: int, count: int, now: float) -> None:
        """`count` events were sent to one member."""
        self._faction(faction_id, now).served += count

    def seen(self, faction_id: int, address: str, now: float) -> None:
        """A request about the faction from `address`."""
        faction = self._faction(faction_id, now)
        faction.seen[address] = now
        if len(faction.seen) > faction.prune_at:
            faction.prune(now)

    def stream_opened(self, faction_id: int, address: str, now: float) -> None:
        streams = self._faction(faction_id, now).streams
        streams[address] = streams.get(address, 0) + 1

    def stream_closed(self, faction_id: int, address: str) -> None:
        streams = self._factions[faction_id].streams
        if streams[address] <= 1:
            del streams[address]
        else:
            streams[address] -= 1

    def statistics(self, now: float) -> dict[int, FactionTrafficStatistics]:
        snapshot = {}
        for faction_id, faction in self._factions.items():
            faction.advance_to(_minute(now))
            faction.prune(now)
            snapshot[faction_id] = FactionTrafficStatistics(
                stored=dict(faction.stored),
                served=faction.served,
                events_per_minute=list(faction.per_minute),
                members=len(faction.seen.keys() | faction.streams.keys()),
                last_upstream_change_at=faction.last_upstream_change_at,
            )
        return snapshot


def _minute(now: float) -> int:
    return int(now // 60)
