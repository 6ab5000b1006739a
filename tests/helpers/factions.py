"""The factions the tests play: the fake upstream's one valid key, two faction ids, and a war call row."""

from __future__ import annotations

from typing import Any

ANON_KEY = "test-anon-key"
FACTION = 46666
OTHER_FACTION = 11581


def call(faction_id: int, call_id: int) -> dict[str, Any]:
    return {
        "id": call_id,
        "faction_id": faction_id,
        "war_id": 77,
        "target_id": 2_000_000 + call_id,
        "caller_id": 1_000 + call_id,
        "caller_name": "alice",
        "created_at": "2026-11-24T15:00:00.118+00:00",
    }
