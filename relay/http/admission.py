"""What a request must pass before the relay answers it: the per-address rate limit and the client's
clock. (Whether its faction is known, or can be revived, is the faction lifecycle's: `relay.factions`.)

Shared by the Quart routes (`relay.http.api`) and the events endpoint below them (`relay.http.events`),
so that both refuse the same requests with the same `ApiError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from relay.http.asgi import UNKNOWN_ADDRESS
from relay.http.ratelimit import retry_after_header
from relay.http.responses import ApiError
from relay.storage.store import StoreError

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services

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


def check_rate(services: Services, client_address: str | None, cost: float = 1.0) -> None:
    wait_s = services.limiter.acquire(client_address or UNKNOWN_ADDRESS, trio.current_time(), cost)
    if wait_s > 0:
        raise ApiError(
            429,
            "rate_limited",
            "too many requests from this address; slow down",
            {"Retry-After": retry_after_header(wait_s)},
        )


async def apply_client_clock(services: Services, since: int | None) -> None:
    """Lamport's rule for a `since` ahead of the relay, within the allowed skew.

    The skew is counted from the relay's clock: the wall clock, or the relay's own cursor when that is
    ahead (after the wall clock stepped back, stamps run ahead of it until it catches up), so that a
    cursor this relay, or another instance on the same stepped clock, handed out is not refused: each
    instance writes the wall clock down as its clock every maintenance pass, so an idle one's cursor
    trails what the clock said by one `maintenance_interval_s` at most, well within the skew allowed.
    """
    store = services.store
    cursor = store.cursor()
    if since is None or since <= cursor:
        return
    relay_clock = max(services.wall_clock_ms(), cursor)
    if since > relay_clock + int(services.config.limits.max_clock_skew_s * 1000):
        raise ApiError(400, "invalid_since", "since is further ahead of the relay's clock than allowed")
    try:
        await store.advance_clock(since)
    except StoreError:
        # While nothing can be written no event can be stored either, so the poll is still answered
        # from memory; its cursor stays the relay's own, below `since`, which the script keeps only
        # when events come with it.
        return
