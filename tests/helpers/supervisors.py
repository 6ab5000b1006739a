"""Supervisors without a store, for the virtual-time tests: settings with the timings those tests
assert, and a sink that keeps what the supervisors deliver in a list (a worker thread would let the
autojump clock jump while a change was being stored)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.config import ChannelConfig
from relay.upstream.connection import ConnectionSettings
from relay.upstream.phoenix import ChangeReceived
from relay.upstream.supervisor import SupervisorSettings

KEY = "anon"
HEARTBEAT_S = 25.0
INITIAL_S, MAX_S = 1.0, 60.0


@dataclass
class Collected:
    changes: dict[int, list[ChangeReceived]] = field(default_factory=dict)

    async def ingest(self, faction_id: int, changes: Sequence[ChangeReceived]) -> None:
        self.changes.setdefault(faction_id, []).extend(changes)

    def types(self, faction_id: int) -> list[str]:
        return [change.data["eventType"] for change in self.changes.get(faction_id, [])]


def war_calls_settings(url: str, **overrides: object) -> SupervisorSettings:
    """Supervisors of one war_calls channel per faction, with the timings these tests assert."""
    settings = SupervisorSettings(
        connection=ConnectionSettings(url, KEY, heartbeat_interval_s=HEARTBEAT_S, connect_timeout_s=10.0),
        channels=[ChannelConfig("war_calls", "faction_id=eq.{faction_id}")],
        backoff_initial_s=INITIAL_S,
        backoff_max_s=MAX_S,
    )
    return dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]


def call(faction_id: int, call_id: int) -> dict[str, object]:
    return {"id": call_id, "faction_id": faction_id, "target_id": 900 + call_id, "caller_name": "alice"}
