"""Holding requests for a faction's next events: long-poll answers, SSE streams, the cap on how many
are held at once, and the `next_poll_ms` advice to plain pollers.

Nothing here stores or parses: the store has published an event before the hub wakes anyone, so a
woken request always finds it in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from relay.http.answers import AnswerCache
from relay.hub import Hub
from relay.storage.store import Store
from relay.traffic import Traffic

# The comment an SSE stream sends when it has nothing else to say: proxies and browsers drop
# connections that stay silent for a minute or so. Also how often the hub wakes quiet factions' streams.
SSE_KEEPALIVE_S = 15.0
SSE_RETRY_MS = 3000
# next_poll_ms: how soon a plain poller should come back, by how lately its faction was active.
ACTIVE_WITHIN_MS, ACTIVE_POLL_MS = 60_000, 1_000
RECENT_WITHIN_MS, RECENT_POLL_MS = 600_000, 3_000
IDLE_POLL_MS = 10_000
# Above this share of max_held_requests the relay asks plain pollers to come back half as often.
BUSY_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class DeliveryStatistics:
    held_long_polls: int
    open_streams: int
    refused_over_cap: int


class HeldRequests:
    """How many long-polls and streams are held, against `limit`. A request is held inside
    `with held.long_poll() as may_hold:` or `with held.stream() as may_hold:`; one that may not be
    held (the relay holds its limit) is answered at once or refused, and its place is given back
    when the `with` ends, however the request ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._long_polls = 0
        self._streams = 0
        self._refused = 0

    @property
    def held(self) -> int:
        return self._long_polls + self._streams

    @property
    def busy(self) -> bool:
        return self.held > self.limit * BUSY_SHARE

    def long_poll(self) -> Hold:
        return Hold(self, stream=False)

    def stream(self) -> Hold:
        return Hold(self, stream=True)

    def _take(self, stream: bool) -> bool:
        if self.held >= self.limit:
            self._refused += 1
            return False
        if stream:
            self._streams += 1
        else:
            self._long_polls += 1
        return True

    def _give_back(self, stream: bool) -> None:
        if stream:
            self._streams -= 1
        else:
            self._long_polls -= 1

    def statistics(self) -> DeliveryStatistics:
        return DeliveryStatistics(self._long_polls, self._streams, self._refused)


class Hold:
    """One request's place under `HeldRequests.limit`: taken on entering if there is room (`with`
    gives whether it was), given back on leaving. A class with slots, not `@contextmanager`: it lives
    as long as its request is held, thousands of them, and a generator and its frame cost more."""

    __slots__ = ("_requests", "_stream", "_taken")

    def __init__(self, requests: HeldRequests, *, stream: bool) -> None:
        self._requests = requests
        self._stream = stream
        self._taken = False

    def __enter__(self) -> bool:
        self._taken = self._requests._take(self._stream)
        return self._taken

    def __exit__(self, *_: object) -> None:
        if self._taken:
            self._requests._give_back(self._stream)


async def wait_for_events(
    store: Store, hub: Hub, faction_id: int, since: int | None, *, linger_s: float
) -> None:
    """Return once the faction has events after `since`, `linger_s` after the first of them so that a
    burst is answered at once, or when the relay stops. The caller bounds the wait (its `wait=`).
    """
    while not store.has_events_since(faction_id, since) and not hub.stopping.is_set():
        await hub.wait_for_notify(faction_id)
    if not hub.stopping.is_set():
        # Several members' wake-ups for one burst of calls cost one answer each, not one per call.
        with trio.move_on_after(linger_s):
            await hub.stopping.wait()


async def stream_events(
    store: Store,
    hub: Hub,
    answers: AnswerCache,
    traffic: Traffic,
    faction_id: int,
    since: int | None,
    send_chunk: Callable[[bytes], Awaitable[None]],
) -> bool:
    """An SSE body: `retry:`, then every event after `since` (or after now), keep-alives, until
    shutdown (then True: the stream ended because the relay ended it).

    A gap is looked for after every read, not only at the start: a stream whose reader fell behind
    (TCP back-pressure on a slow phone during a burst) wakes up to find its next events trimmed, and
    is told so by a `truncated` event before the events that are left, once per gap.
    """
    await send_chunk(f"retry: {SSE_RETRY_MS}\n\n".encode())
    cursor = store.cursor() if since is None else since
    announced_gap_at: int | None = None
    last_sent = trio.current_time()
    while not hub.stopping.is_set():
        store.touch(faction_id)  # an open stream is a member still watching
        found, _ = await store.read_since(faction_id, cursor)
        # After the read: a trim during it can take events it meant to return (`Store.read_since`).
        if announced_gap_at != cursor and store.missed_since(faction_id, cursor):
            announced_gap_at = cursor
            await send_chunk(truncated_chunk(faction_id, cursor))
            last_sent = trio.current_time()
        if found:
            await send_chunk(answers.stream_chunk(faction_id, found))
            cursor = found[-1].timestamp
            last_sent = trio.current_time()
            traffic.served(faction_id, len(found), last_sent)
            continue
        if trio.current_time() - last_sent >= SSE_KEEPALIVE_S / 2:
            await send_chunk(b": keep-alive\n\n")
            last_sent = trio.current_time()
        # No timer per stream: the hub wakes quiet factions' waiters every SSE_KEEPALIVE_S
        # (`Hub.wake_quiet_factions_every`), so a silent stream says something every 7.5-22.5 s.
        await hub.wait_for_notify(faction_id)
    return True


def truncated_chunk(faction_id: int, since: int) -> bytes:
    """The SSE event saying events after `since` are gone. No id: the resume point stays the last
    event the client really has, so a reconnect from it is told again rather than skipping the gap."""
    return f'event: truncated\ndata: {{"faction_id":{faction_id},"since":{since}}}\n\n'.encode()


def next_poll_ms(store: Store, held: HeldRequests, faction_id: int) -> int:
    """Advice for a plain poller: sooner while its faction is active, later when idle or the relay busy.
    Measured on the monotonic clock (`Store.quiet_for_ms`), so a wall-clock step does not skew it."""
    idle_ms = store.quiet_for_ms(faction_id)
    if idle_ms is not None and idle_ms < ACTIVE_WITHIN_MS:
        advice = ACTIVE_POLL_MS
    elif idle_ms is not None and idle_ms < RECENT_WITHIN_MS:
        advice = RECENT_POLL_MS
    else:
        advice = IDLE_POLL_MS
    return advice * 2 if held.busy else advice
