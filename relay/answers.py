"""What members are sent, built once and sent to every member who asks the same question: whole
`/events` answers, and the SSE chunk of each new burst.

Members of a faction poll with the same cursor: after an event, each of them holds the timestamp of
that event, and fifty held long-polls or streams are woken by the same commit. Their answers are
the same bytes, so each is built once, not once per member.

An answer is fixed by its key, so nothing is ever invalidated, only evicted: stored events never
change, a faction's retained events only grow at the newest end, stamped in increasing order (older
ones leave only when newer ones arrive, which moves the cursor), and the cursor of an answer with
events is its newest event.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.store import StoredEvent

Headers = list[tuple[bytes, bytes]]
# A bound on the bytes kept, not on the entries: an answer is ~60 bytes with no event and up to a
# faction's whole retention (tens of KB) for a cursor far behind.
MAX_CACHED_BYTES = 4 * 1024 * 1024


def events_body(
    found: Sequence[StoredEvent], cursor: int, next_poll: int, *, truncated: bool = False
) -> bytes:
    """An `/events` answer: each event's JSON was built once when it was stored, so this only joins.
    `truncated` (only sent when true) says events after the client's `since` are no longer retained."""
    events = ",".join([event.json for event in found])
    gap = ',"truncated":true' if truncated else ""
    return f'{{"events":[{events}],"timestamp":{cursor},"next_poll_ms":{next_poll}{gap}}}'.encode()


class Answers:
    """Status-200 `/events` answers (headers with their content-length, and the body) and SSE chunks."""

    def __init__(self, headers: Headers, *, max_bytes: int = MAX_CACHED_BYTES) -> None:
        self._headers = headers
        self._max_bytes = max_bytes
        self._answers: dict[tuple[int, int, int, int, bool], tuple[Headers, bytes]] = {}
        self._chunks: dict[tuple[int, int, int], bytes] = {}
        self._bytes = 0
        self.built = 0
        self.reused = 0

    def poll(
        self,
        faction_id: int,
        found: Sequence[StoredEvent],
        cursor: int,
        next_poll_ms: int,
        *,
        truncated: bool,
    ) -> tuple[Headers, bytes]:
        # Events are a suffix of the faction's retained ones ending at the cursor, so the faction, the
        # cursor and their number name them, whatever `since` the member sent. With no event every
        # faction's answer is the same for the same cursor and advice.
        key = (faction_id if found else 0, len(found), cursor, next_poll_ms, truncated)
        cached = self._answers.get(key)
        if cached is not None:
            self.reused += 1
            return cached
        body = events_body(found, cursor, next_poll_ms, truncated=truncated)
        built = ([*self._headers, (b"content-length", str(len(body)).encode())], body)
        self._make_room(len(body))
        self._answers[key] = built
        self.built += 1
        return built

    def stream_chunk(self, faction_id: int, found: Sequence[StoredEvent]) -> bytes:
        """The SSE messages of `found` (not empty), each with its id, type and the event's JSON."""
        key = (faction_id, len(found), found[-1].timestamp)
        cached = self._chunks.get(key)
        if cached is not None:
            self.reused += 1
            return cached
        chunk = "".join([f"id: {e.timestamp}\nevent: {e.type}\ndata: {e.json}\n\n" for e in found]).encode()
        self._make_room(len(chunk))
        self._chunks[key] = chunk
        self.built += 1
        return chunk

    def _make_room(self, size: int) -> None:
        if self._bytes + size > self._max_bytes:
            # Whole eviction: the cursors in use move on with every event, so what is kept is soon
            # stale anyway, and clearing costs nothing per answer.
            self._answers.clear()
            self._chunks.clear()
            self._bytes = 0
        self._bytes += size
