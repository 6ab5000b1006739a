"""Whole `/events` answers, built once and sent to every poll that asks the same question.

Members of a faction poll with the same cursor: after an event, each of them holds the timestamp of
that event, and a held long-poll of all fifty is woken by the same commit. Their answers are the
same bytes, so each is built once, not once per member.

An answer is fixed by its key, so nothing is ever invalidated, only evicted: stored events never
change, a faction's retained events only grow at the newest end, stamped in increasing order (older
ones leave only when newer ones arrive, which moves the cursor), and the cursor of an answer with
events is its newest event.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.delivery import events_body
from relay.store import StoredEvent

Headers = list[tuple[bytes, bytes]]
# A bound on the bytes kept, not on the entries: an answer is ~60 bytes with no event and up to a
# faction's whole retention (tens of KB) for a cursor far behind.
MAX_CACHED_BYTES = 4 * 1024 * 1024


class PollAnswers:
    """Status-200 `/events` answers: headers with their content-length, and the body."""

    def __init__(self, headers: Headers, *, max_bytes: int = MAX_CACHED_BYTES) -> None:
        self._headers = headers
        self._max_bytes = max_bytes
        self._answers: dict[tuple[int, int, int, int, bool], tuple[Headers, bytes]] = {}
        self._bytes = 0
        self.built = 0
        self.reused = 0

    def answer(
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
        if self._bytes + len(body) > self._max_bytes:
            # Whole eviction: the cursors in use move on with every event, so what is kept is soon
            # stale anyway, and clearing costs nothing per answer.
            self._answers.clear()
            self._bytes = 0
        self._answers[key] = built
        self._bytes += len(body)
        self.built += 1
        return built
