"""A faction's lifecycle, in one place: subscribed, on standby, revived, expired.

    POST /subscribe ─────────────▶ active (an upstream socket, counted against max_factions)
    standby subscribe ──▶ known, no socket (bounded by max_standby_factions) ─┐
    no poll for subscription_ttl_s: active ──▶ expired, no socket ────────────┤
    a poll (or stream) of a known faction ◀── revived, if there is capacity ◀─┘

The store keeps the subscription (`relay.storage.store`), the registry the socket (`relay.upstream.supervisor`); this
object is the only one that changes either, so that the two always agree and every way into
"active" passes the same capacity check. Its refusals are the API's (`ApiError`), since every caller
is a request or the relay's own upkeep.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from relay.config import LimitsConfig
from relay.http.responses import ApiError
from relay.storage.store import Store
from relay.upstream.supervisor import Supervisors

log = logging.getLogger(__name__)


class Factions:
    def __init__(self, store: Store, supervisors: Supervisors, limits: LimitsConfig) -> None:
        self._store = store
        self._supervisors = supervisors
        self._max_active = limits.max_factions
        self._max_standby = limits.max_standby_factions
        self._standing_by: set[int] = set()  # standby subscribes still being written
        # Factions being made active (subscribed or revived) whose write is still in its thread: they
        # hold their place under max_factions from the check on, so that requests arriving during the
        # write cannot all pass the same check (50 concurrent subscribes once made 50 sockets of 5).
        self._activating: Counter[int] = Counter()
        self._standby_full = False  # for one log line when it fills, and one when there is room again

    def __repr__(self) -> str:
        return f"<Factions max_factions={self._max_active} max_standby_factions={self._max_standby}>"

    async def subscribe(self, faction_id: int) -> None:
        """Active from now on, with its upstream socket; `429 too_many_factions` beyond capacity."""
        with self._activation(faction_id):
            await self._store.subscribe(faction_id)
            self._supervisors.ensure_running(faction_id)

    async def stand_by(self, faction_id: int) -> None:
        """Known, without a socket (`X-CAT-Relay-Standby: 1`), unless already known: a later poll
        revives it here. A faction not known yet is kept only while fewer than
        `limits.max_standby_factions` known factions are inactive (on standby, or expired: the store
        tells them apart no more than /status does, and each is kept for good and listed in every
        /status and /metrics). Beyond it: `429 too_many_standby_factions`. Standby subscribes still
        being written count, so that concurrent ones cannot overshoot."""
        if self._store.subscription(faction_id) is None:
            self._make_standby_room(faction_id)
        self._standing_by.add(faction_id)
        try:
            await self._store.stand_by(faction_id)
        finally:
            self._standing_by.discard(faction_id)

    async def admit(self, faction_id: int) -> None:
        """A request about a faction: 404 if never subscribed; revives an expired one; is activity."""
        subscription = self._store.subscription(faction_id)
        if subscription is None:
            raise ApiError(
                404, "not_subscribed", f"faction {faction_id} is not subscribed; POST /subscribe first"
            )
        if not subscription.active:
            # Today's script never re-subscribes, so its poll is what brings an expired faction back.
            with self._activation(faction_id):
                await self._store.revive(faction_id)
                self._supervisors.ensure_running(faction_id)
        self._store.touch(faction_id)

    async def expire_idle(self, ttl_s: float) -> list[int]:
        """Expire the factions nobody asked about for `ttl_s`, and close their sockets."""
        expired = await self._store.expire_idle(int(ttl_s * 1000))
        for faction_id in expired:
            await self._supervisors.stop(faction_id)
        return expired

    @contextmanager
    def _activation(self, faction_id: int) -> Iterator[None]:
        """Checks capacity and holds the faction's place until the `with` ends, before any await:
        by then it is active (counted by the store) or its write failed (the place is given back)."""
        # One upstream socket per active faction counts against the Supabase project's connections.
        if not self._active(faction_id) and faction_id not in self._activating:
            being_activated = sum(1 for other in self._activating if not self._active(other))
            if len(self._store.active_factions()) + being_activated >= self._max_active:
                raise ApiError(
                    429, "too_many_factions", f"this relay serves at most {self._max_active} factions"
                )
        self._activating[faction_id] += 1
        try:
            yield
        finally:
            self._activating[faction_id] -= 1
            if not self._activating[faction_id]:
                del self._activating[faction_id]

    def _active(self, faction_id: int) -> bool:
        subscription = self._store.subscription(faction_id)
        return subscription is not None and subscription.active

    def _make_standby_room(self, faction_id: int) -> None:
        counts = self._store.statistics()
        writing = len(self._standing_by) - (faction_id in self._standing_by)
        if counts.factions - counts.active_factions + writing >= self._max_standby:
            if not self._standby_full:
                self._standby_full = True
                log.warning("%r: standby is full; standby subscribes for new factions are refused", self)
            raise ApiError(
                429,
                "too_many_standby_factions",
                f"this relay keeps at most {self._max_standby} factions it does not serve (on standby or expired)",
            )
        if self._standby_full:
            self._standby_full = False
            log.info("%r: room again for factions on standby", self)
