"""`/events` answers built once per question: the same bytes as building each, shared, bounded."""

from __future__ import annotations

import json

from relay.answers import Answers, events_body
from relay.store import StoredEvent

HEADERS = [(b"content-type", b"application/json")]


def event(id: int, faction_id: int, timestamp: int) -> StoredEvent:
    return StoredEvent.build(id, faction_id, timestamp, "postgres_changes", json.dumps({"n": id}))


def test_an_answer_is_the_body_events_body_builds_with_its_length() -> None:
    answers = Answers(HEADERS)
    found = [event(1, 7, 100), event(2, 7, 101)]
    headers, body = answers.poll(7, found, 101, 1000, truncated=True)
    assert body == events_body(found, 101, 1000, truncated=True)
    assert headers == [*HEADERS, (b"content-length", str(len(body)).encode())]


def test_the_same_question_is_answered_from_the_bytes_built_the_first_time() -> None:
    answers = Answers(HEADERS)
    found = [event(1, 7, 100)]
    first = answers.poll(7, found, 100, 1000, truncated=False)
    again = answers.poll(7, [event(1, 7, 100)], 100, 1000, truncated=False)
    assert again is first
    assert (answers.built, answers.reused) == (1, 1)


def test_answers_differ_by_faction_events_cursor_advice_and_truncation() -> None:
    answers = Answers(HEADERS)
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
    answers = Answers(HEADERS)
    assert answers.poll(7, [], 500, 1000, truncated=False) is answers.poll(8, [], 500, 1000, truncated=False)


def test_the_bytes_kept_are_bounded_and_answers_stay_right_after_eviction() -> None:
    answers = Answers(HEADERS, max_bytes=200)
    for cursor in range(1_000, 1_020):
        _, body = answers.poll(7, [], cursor, 1000, truncated=False)
        assert json.loads(body)["timestamp"] == cursor
    assert answers.built == 20
    _, body = answers.poll(7, [], 1_019, 1000, truncated=False)  # kept since the last eviction
    assert answers.reused == 1
    _, body = answers.poll(7, [], 1_000, 1000, truncated=False)  # evicted: built again, correctly
    assert json.loads(body)["timestamp"] == 1_000
    assert answers.built == 21
