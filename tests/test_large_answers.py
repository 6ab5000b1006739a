"""`/state` made of the rows' stored texts, in pieces: the bytes of the answer built whole."""

from __future__ import annotations

import json

import pytest

from relay.http.large import PIECE_BYTES, state_answer
from relay.storage.planning import encode
from relay.storage.store import StateTexts

pytestmark = pytest.mark.unit

KEYS = {"war_calls": "id", "faction_messages": "id", "wars": "id"}


def whole(faction_id: int, timestamp: int, tables: dict[str, list[object]]) -> bytes:
    answer = {"faction_id": faction_id, "timestamp": timestamp, "tables": tables, "keys": KEYS}
    return json.dumps(answer, separators=(",", ":")).encode()


def stored(tables: dict[str, list[object]]) -> dict[str, list[bytes]]:
    """The rows as the store keeps them (`_write_rows`)."""
    return {table: [encode(row).encode() for row in rows] for table, rows in tables.items()}


def test_every_kind_of_value_reads_as_the_whole_encoding() -> None:
    tables: dict[str, list[object]] = {
        "war_calls": [
            {"id": 1, "caller_name": 'Zoë \u2603 "quoted" \\ back\nslash', "target": None, "ok": True},
            {"id": 2, "hp": 1.5e-7, "big": 2**70, "neg": -0.0, "nested": {"a": [1, {"b": []}], "c": {}}},
            {"id": "3", "emoji": "\U0001f408", "control": "\x00\x1f"},
        ],
        "faction_messages": [],
        "wars": [{"id": 9}],
    }
    pieces = state_answer(46666, StateTexts(123456789, stored(tables)), KEYS)
    assert b"".join(pieces) == whole(46666, 123456789, tables)
    assert len(pieces) == 1


def test_no_rows_at_all() -> None:
    tables: dict[str, list[object]] = {"war_calls": [], "faction_messages": [], "wars": []}
    assert state_answer(1, StateTexts(0, stored(tables)), KEYS) == [whole(1, 0, tables)]


def test_a_large_state_comes_in_bounded_pieces_that_join_to_the_whole() -> None:
    rows: list[object] = [
        {"id": n, "caller_name": f"member {n}", "pad": "x" * (n % 3_000)} for n in range(3_000)
    ]
    tables = {"war_calls": rows, "faction_messages": rows[:10], "wars": []}
    pieces = state_answer(7, StateTexts(42, stored(tables)), KEYS)
    assert b"".join(pieces) == whole(7, 42, tables)
    largest_row = max(len(encode(row)) for row in rows)
    assert len(pieces) > 10
    assert all(len(piece) < PIECE_BYTES + largest_row + 64 for piece in pieces)
