"""`/events` answers built once per question: the same bytes as building each, shared, bounded."""

from __future__ import annotations

import json

import pytest

from relay.http.answers import MAX_CACHED_BYTES, MAX_LARGE_CACHED_BYTES, AnswerCache, events_body
from relay.storage.store import StoredEvent

pytestmark = pytest.mark.unit

HEADERS = [(b"content-type", b"application/json")]


def event(id: int, faction_id: int, timestamp: int) -> StoredEvent:
    return StoredEvent.build(id, faction_id, timestamp, "postgres_changes", json.dumps({"n": id}))


def test_an_answer_is_the_body_events_body_builds_with_its_length() -> None:
    answers = AnswerCache(HEADERS)
    found = [event(1, 7, 100), event(2, 7, 101)]
    headers, body = answers.poll(7, found, 101, 1000, truncated=True)
    assert body == events_body(found, 101, 1000, truncated=True)
    assert headers == [*HEADERS, (b"content-length", str(len(body)).encode())]


def test_the_same_question_is_answered_from_the_bytes_built_the_first_time() -> None:
    answers = AnswerCache(HEADERS)
    found = [event(1, 7, 100)]
    first = answers.poll(7, found, 100, 1000, truncated=False)
    again = answers.poll(7, [event(1, 7, 100)], 100, 1000, truncated=False)
    assert again is first
    assert (answers.built, answers.reused) == (1, 1)


def test_answers_differ_by_faction_events_cursor_advice_and_truncation() -> None:
    answers = AnswerCache(HEADERS)
    older, newer = event(1, 7, 100), event(2, 7, 101)
    bodies = {
        answers.poll(7, [older, newer], 101, 1000, truncated=False)[1],
        answers.poll(7, [newer], 101, 1000, truncated=False)[1],
        answers.poll(8, [event(3, 8, 101)], 101, 1000, truncated=False)[1],
        answers.poll(7, [newer], 101, 3000, truncated=False)[1],
        answers.poll(7, [newer], 101, 1000, truncated=True)[1],
        answers.poll(7, [], 101, 1000, truncated=False)[1],
        answers.poll(7, [], 102, 1000, truncated=False)[1],
    }
    assert len(bodies) == 7
    assert answers.built == 7


def test_with_no_event_every_faction_shares_the_answer_for_a_cursor() -> None:
    answers = AnswerCache(HEADERS)
    assert answers.poll(7, [], 500, 1000, truncated=False) is answers.poll(8, [], 500, 1000, truncated=False)


def test_the_bytes_kept_are_bounded_and_answers_stay_right_after_eviction() -> None:
    answers = AnswerCache(HEADERS, max_bytes=200)
    for cursor in range(1_000, 1_020):
        _, body = answers.poll(7, [], cursor, 1000, truncated=False)
        assert json.loads(body)["timestamp"] == cursor
    assert answers.built == 20
    _, body = answers.poll(7, [], 1_019, 1000, truncated=False)  # kept since the last eviction
    assert answers.reused == 1
    _, body = answers.poll(7, [], 1_000, 1000, truncated=False)  # evicted: built again, correctly
    assert json.loads(body)["timestamp"] == 1_000
    assert answers.built == 21


def large_events(faction_id: int, count: int, size: int, first_id: int = 1) -> list[StoredEvent]:
    """`count` events of about `size` bytes each, stamped one after another."""
    return [
        StoredEvent.build(n, faction_id, 1_000 + n, "hospital_update", json.dumps({"blob": "x" * size}))
        for n in range(first_id, first_id + count)
    ]


def test_a_large_answer_is_shared_by_every_poll_asking_for_it() -> None:
    """A whole retention of large published events (above the small table's 4 MiB): every reader far
    behind gets the very same bytes, even with other answers built between their polls."""
    answers = AnswerCache(HEADERS)
    found = large_events(7, 20, 250_000)
    first = answers.poll(7, found, found[-1].timestamp, 1000, truncated=False)
    assert len(first[1]) > MAX_CACHED_BYTES
    for cursor in range(5_000, 5_100):  # members of other factions polling meanwhile
        answers.poll(8, [], cursor, 1000, truncated=False)
    again = answers.poll(7, list(found), found[-1].timestamp, 1000, truncated=False)
    assert again is first
    assert again[1] is first[1]
    assert answers.built == 101
    assert answers.retained_bytes <= MAX_CACHED_BYTES + MAX_LARGE_CACHED_BYTES


def test_a_large_stream_chunk_is_shared_too() -> None:
    answers = AnswerCache(HEADERS)
    found = large_events(7, 20, 250_000)
    first = answers.stream_chunk(7, found)
    answers.stream_chunk(8, [event(1, 8, 100)])
    assert answers.stream_chunk(7, list(found)) is first


def test_large_answers_are_bounded_by_bytes_least_recently_asked_first() -> None:
    answers = AnswerCache(HEADERS, max_bytes=10_000, large_from_bytes=1_000, max_large_bytes=10_000)
    shared = large_events(7, 1, 2_000)
    kept = answers.poll(7, shared, shared[-1].timestamp, 1000, truncated=False)
    for faction_id in range(100, 140):  # 40 other large answers of ~2 KB: 80 KB built
        found = large_events(faction_id, 1, 2_000)
        answers.poll(faction_id, found, found[-1].timestamp, 1000, truncated=False)
        assert answers.poll(7, shared, shared[-1].timestamp, 1000, truncated=False) is kept  # asked again
        assert answers.retained_bytes <= 20_000
    assert answers.built == 41
    evicted = large_events(100, 1, 2_000)
    answers.poll(100, evicted, evicted[-1].timestamp, 1000, truncated=False)
    assert answers.built == 42  # the least recently asked for went first


def test_an_answer_larger_than_the_whole_large_bound_is_built_each_time_and_never_kept() -> None:
    answers = AnswerCache(HEADERS, large_from_bytes=1_000, max_large_bytes=5_000)
    found = large_events(7, 1, 6_000)
    first = answers.poll(7, found, found[-1].timestamp, 1000, truncated=False)
    assert answers.poll(7, found, found[-1].timestamp, 1000, truncated=False) == first
    assert answers.built == 2
    assert answers.retained_bytes == 0
