"""What a request must pass before the relay answers it: the per-address rate limit, the faction being
known (and revived, within capacity, when it had expired), room for a faction on standby, and the
client's clock.

Shared by the Quart routes (`relay.api`) and the events endpoint below them (`relay.events_http`),
so that both refuse the same requests with the same `ApiError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from relay.asgi import UNKNOWN_ADDRESS
from relay.config import Config
from relay.delivery import HeldRequests
from relay.http_stats import HttpCounters
from relay.hub import Hub
from relay.ratelimit import RateLimiter, retry_after_header
from relay.responses import ApiError
from relay.store import Store, StoreError
from relay.supervisor import Supervisors
from relay.traffic import Traffic

log = logging.getLogger(__name__)

# The routes a client address is rate-limited on: everything that costs the relay work per member,
# and the views of the whole relay. /ping and /health stay free: monitors ask them, and they are cheap.
RATE_LIMITED_PATHS = frozenset(
    {
        "/subscribe",
        "/events",
        "/events/stream",
        "/state",
        "/hospital",
        "/faction-members",
        "/status",
        "/metrics",
    }
)
# Tokens a request takes from its address's bucket: one, except for /status and /metrics, which walk
# every known faction (a poll reads one), so an address gets a tenth as many of them: 2 a second at
# the default limits.client_rate of 20. A Prometheus scrape every second takes half of the rate, and
# is refused only if the same address also polls about ten times a second.
VIEW_COST = 10
REQUEST_COSTS = {"/status": VIEW_COST, "/metrics": VIEW_COST}


@dataclass(frozen=True, slots=True)
class Services:
    """The running relay as the HTTP side sees it."""

    config: Config
    store: Store
    supervisors: Supervisors
    hub: Hub
    held: HeldRequests
    limiter: RateLimiter
    traffic: Traffic
    http: HttpCounters
    version: str
    started_at: float  # trio clock
    wall_clock_ms: Callable[[], int]


def check_rate(services: Services, client_address: str | None, cost: float = 1.0) -> None:
    wait_s = services.limiter.acquire(client_address or UNKNOWN_ADDRESS, trio.current_time(), cost)
    if wait_s > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many requests from this address; slow down",
            {"Retry-After": retry_after_header(wait_s)},
        )


def ensure_capacity(services: Services, faction_id: int) -> None:
    # One upstream socket per active faction counts against the Supabase project's connections.
    store, limit = services.store, services.config.limits.max_factions
    subscription = store.subscription(faction_id)
    already_active = subscription is not None and subscription.active
    if not already_active and len(store.active_factions()) >= limit:
        raise ApiError(429, "too_many_factions", f"this relay serves at most {limit} factions")


class StandbyRoom:
    """Standby subscribes (`X-CAT-Relay-Standby: 1`), bounded: a faction this relay does not know yet
    is kept on standby only while fewer than `limits.max_standby_factions` known factions are
    inactive (on standby, or expired: the store tells them apart no more than /status does, and each
    is kept for good and listed in every /status and /metrics). Beyond it: `429
    too_many_standby_factions`. Standby subscribes still being written count, so that concurrent
    ones cannot overshoot."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._writing: set[int] = set()
        self._full = False  # for one log line when it fills, and one when there is room again

    def __repr__(self) -> str:
        return f"<StandbyRoom limit={self._services.config.limits.max_standby_factions}>"

    async def stand_by(self, faction_id: int) -> None:
        store = self._services.store
        if store.subscription(faction_id) is None:
            self._make_room(faction_id)
        self._writing.add(faction_id)
        try:
            await store.stand_by(faction_id)
        finally:
            self._writing.discard(faction_id)

    def _make_room(self, faction_id: int) -> None:
        limit = self._services.config.limits.max_standby_factions
        counts = self._services.store.statistics()
        writing = len(self._writing) - (faction_id in self._writing)
        if counts.factions - counts.active_factions + writing >= limit:
            if not self._full:
                self._full = True
                log.warning("%r: full; standby subscribes for new factions are refused", self)
            raise ApiError(
                429,
                "too_many_standby_factions",
                f"this relay keeps at most {limit} factions it does not serve (on standby or expired)",
            )
        if self._full:
            self._full = False
            log.info("%r: room again for factions on standby", self)


async def admit_faction(services: Services, faction_id: int) -> None:
    """A request about a faction: 404 if never subscribed; revives an expired one; is activity."""
    store = services.store
    subscription = store.subscription(faction_id)
    if subscription is None:
        raise ApiError(
            404, "not_subscribed", f"faction {faction_id} is not subscribed; POST /subscribe first"
        )
    if not subscription.active:
        # Today's script never re-subscribes, so its poll is what brings an expired faction back.
        ensure_capacity(services, faction_id)
        await store.revive(faction_id)
        services.supervisors.ensure_running(faction_id)
    store.touch(faction_id)


async def apply_client_clock(services: Services, since: int | None) -> None:
    """Lamport's rule for a `since` ahead of the relay, within the allowed skew."""
    store = services.store
    if since is None or since <= store.cursor():
        return
    if since > services.wall_clock_ms() + int(services.config.limits.max_clock_skew_s * 1000):
        raise ApiError(400, "invalid_since", "since is further ahead of the relay's clock than allowed")
    try:
        await store.advance_clock(since)
    except StoreError:
        # While nothing can be written no event can be stored either, so the poll is still answered
        # from memory; its cursor stays the relay's own, below `since`, which the script keeps only
        # when events come with it.
        return
