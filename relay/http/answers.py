"""What members are sent, built once and sent to every member who asks the same question: whole
`/events` answers, and the SSE chunk of each new burst.

Members of a faction poll with the same cursor: after an event, each of them holds the timestamp of
that event, and fifty held long-polls or streams are woken by the same commit. Their answers are
the same bytes, so each is built once, not once per member.

An answer is fixed by its key, so nothing is ever invalidated, only evicted: stored events never
change, a faction's retained events only grow at the newest end, stamped in increasing order (older
ones leave only when newer ones arrive, which moves the cursor), and the cursor of an answer with
events is its newest event.

Memory, in all and per connection. Small answers (under `LARGE_ANSWER_BYTES`) share one table of at
most `MAX_CACHED_BYTES`, cleared whole when full. Large ones (a cursor far behind, large published
events) are kept apart, least recently asked for evicted first, at most `MAX_LARGE_CACHED_BYTES` in
all, so that a run of small answers never evicts them and they never clear the small ones. The cache
itself thus retains at most 12 MiB, however many members ask. A connection holds one answer at a
time: a poll its whole answer (at most `retention.memory_bytes_per_faction` of events, 512 KiB at the
defaults: a cursor further behind is answered a page at a time), a stream one chunk; and it is the very object in the cache, so
connections asking the same question hold one copy between them, readers that stop reading included,
and a poll asking it again is not rebuilt. In all: the cache, plus one answer per distinct question
still being sent; how long a reader that stops reading may keep its answer is the HTTP layer's bound.
An answer larger than `MAX_LARGE_CACHED_BYTES` (possible only with retention or publish limits
raised) is never kept, and is built for each poll.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar, cast

from relay.storage.store import StoredEvent

Headers = list[tuple[bytes, bytes]]
Answer = tuple[Headers, bytes]
K = TypeVar("K", bound=tuple[object, ...])
V = TypeVar("V", tuple[Headers, bytes], bytes)
# A bound on the bytes kept, not on the entries: an answer is ~60 bytes with no event and up to a
# faction's whole retention (tens of KB) for a cursor far behind.
MAX_CACHED_BYTES = 4 * 1024 * 1024
# From this size on an answer is large: one of them would take a sixteenth of the small table, and
# a few would clear it for everyone.
LARGE_ANSWER_BYTES = 256 * 1024
# Room for sixteen of the largest answers at the defaults (a page of `retention.memory_bytes_per_faction`):
# the pages readers far behind ask for stay shared, however many readers there are.
MAX_LARGE_CACHED_BYTES = 8 * 1024 * 1024


def events_body(
    found: Sequence[StoredEvent], cursor: int, next_poll: int, *, truncated: bool = False
) -> bytes:
    """An `/events` answer: each event's JSON was built once when it was stored, so this only joins.
    `truncated` (only sent when true) says events after the client's `since` are no longer retained."""
    events = ",".join([event.json for event in found])
    gap = ',"truncated":true' if truncated else ""
    return f'{{"events":[{events}],"timestamp":{cursor},"next_poll_ms":{next_poll}{gap}}}'.encode()


class AnswerCache:
    """Status-200 `/events` answers (headers with their content-length, and the body) and SSE chunks."""

    def __init__(
        self,
        headers: Headers,
        *,
        max_bytes: int = MAX_CACHED_BYTES,
        large_from_bytes: int = LARGE_ANSWER_BYTES,
        max_large_bytes: int = MAX_LARGE_CACHED_BYTES,
    ) -> None:
        self._headers = headers
        self._max_bytes = max_bytes
        self._large_from = large_from_bytes
        self._max_large_bytes = max_large_bytes
        self._answers: dict[tuple[int, int, int, int, bool], Answer] = {}
        self._chunks: dict[tuple[int, int, int], bytes] = {}
        self._bytes = 0
        # Large answers and chunks alike, by key (an answer's key has five parts, a chunk's three).
        self._large: OrderedDict[tuple[object, ...], tuple[int, Answer | bytes]] = OrderedDict()
        self._large_bytes = 0
        self.built = 0
        self.reused = 0

    @property
    def retained_bytes(self) -> int:
        """The bytes of the answers and chunks this cache keeps alive."""
        return self._bytes + self._large_bytes

    def poll(
        self,
        faction_id: int,
        found: Sequence[StoredEvent],
        cursor: int,
        next_poll_ms: int,
        *,
        truncated: bool,
    ) -> Answer:
        # Events are a suffix of the faction's retained ones ending at the cursor, so the faction, the
        # cursor and their number name them, whatever `since` the member sent. With no event every
        # faction's answer is the same for the same cursor and advice.
        key = (faction_id if found else 0, len(found), cursor, next_poll_ms, truncated)
        cached = self._cached(self._answers, key)
        if cached is not None:
            return cached
        body = events_body(found, cursor, next_poll_ms, truncated=truncated)
        built = ([*self._headers, (b"content-length", str(len(body)).encode())], body)
        self._keep(self._answers, key, len(body), built)
        return built

    def stream_chunk(self, faction_id: int, found: Sequence[StoredEvent]) -> bytes:
        """The SSE messages of `found` (not empty), each with its id, type and the event's JSON."""
        key = (faction_id, len(found), found[-1].timestamp)
        cached = self._cached(self._chunks, key)
        if cached is not None:
            return cached
        chunk = "".join([f"id: {e.timestamp}\nevent: {e.type}\ndata: {e.json}\n\n" for e in found]).encode()
        self._keep(self._chunks, key, len(chunk), chunk)
        return chunk

    def _cached(self, small: dict[K, V], key: K) -> V | None:
        """What was built for `key`, from the small table or the large one. One large table serves
        answers and chunks alike: their keys have five parts and three, so they never meet."""
        found = small.get(key)
        if found is None:
            kept = self._large.get(key)
            if kept is not None:
                self._large.move_to_end(key)  # most recently asked for last
                found = cast(V, kept[1])
        if found is not None:
            self.reused += 1
        return found

    def _keep(self, small: dict[K, V], key: K, size: int, value: V) -> None:
        if size >= self._large_from:
            self._large_put(key, size, value)
        else:
            self._make_room(size)
            small[key] = value
        self.built += 1

    def _make_room(self, size: int) -> None:
        if self._bytes + size > self._max_bytes:
            # Whole eviction: the cursors in use move on with every event, so what is kept is soon
            # stale anyway, and clearing costs nothing per answer.
            self._answers.clear()
            self._chunks.clear()
            self._bytes = 0
        self._bytes += size

    def _large_put(self, key: tuple[object, ...], size: int, value: Answer | bytes) -> None:
        if size > self._max_large_bytes:
            return  # larger than the whole bound: never kept
        while self._large and self._large_bytes + size > self._max_large_bytes:
            evicted_size, _ = self._large.popitem(last=False)[1]
            self._large_bytes -= evicted_size
        self._large[key] = (size, value)
        self._large_bytes += size
