"""Plausible CAT war traffic for the fake Supabase: calls made, handed over and dropped, and chat.

Used by `relay demo` so that a person watching `/events` sees what a faction sees during a ranked war.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from relay.testing.fake_supabase import FakeSupabase

MEMBERS_PER_FACTION = 12
ENEMIES_PER_FACTION = 30
MAX_OPEN_CALLS = 8  # beyond this a faction mostly resolves calls instead of making new ones
MESSAGE_SHARE = 0.1
FIRST_ID = 1_000
# Torn player ids are below about 3.5 million; ranked war ids are in the tens of thousands.
PLAYER_IDS = (100_000, 3_500_000)
WAR_IDS = (20_000, 40_000)

_NAME_STARTS = (
    "Dark", "Iron", "Toxic", "Lucky", "Silent", "Vodka", "Neon", "Rusty", "Savage", "Mad",
    "Frosty", "Crimson", "Lazy", "Grim", "Shady", "Salty", "Wicked", "Turbo",
)  # fmt: skip
_NAME_ENDS = (
    "Wolf", "Fist", "Blade", "Bunny", "Viper", "Reaper", "Mugger", "Duke", "Ghost", "Bandit",
    "Hawk", "Knuckles", "Jester", "Rook", "Tiger", "Baron",
)  # fmt: skip
_CHAT = (
    "Chain is at {n}, keep it going",
    "Need a revive please",
    "Medding out, back in 5",
    "{name} is out of hospital, hit him now",
    "Don't hit {name}, he's travelling",
    "Going for {name}, bust me if I'm stuck",
    "Xanax taken, full energy for the next push",
    "Their chain just broke!",
    "Watch out, {name} is online and stacking",
    "Good hits everyone, {n} respect so far",
)


@dataclass(frozen=True)
class _Player:
    id: int
    name: str


@dataclass
class _Faction:
    id: int
    war_id: int
    members: list[_Player]
    enemies: list[_Player]


def _player(rng: random.Random) -> _Player:
    name = rng.choice(_NAME_STARTS) + rng.choice(_NAME_ENDS)
    if rng.random() < 0.5:
        name += str(rng.randint(1, 999))
    return _Player(rng.randint(*PLAYER_IDS), name)


def _faction(faction_id: int, rng: random.Random) -> _Faction:
    members = [_player(rng) for _ in range(MEMBERS_PER_FACTION)]
    enemies = [_player(rng) for _ in range(ENEMIES_PER_FACTION)]
    return _Faction(faction_id, rng.randint(*WAR_IDS), members, enemies)


def _now() -> str:
    # Postgres renders timestamptz through to_jsonb like this: microseconds and an explicit offset.
    return datetime.now(UTC).isoformat()


class _Traffic:
    """One step of war traffic at a time, keeping ids unique within each table."""

    def __init__(self, fake: FakeSupabase, factions: Sequence[_Faction], rng: random.Random) -> None:
        self.fake = fake
        self.factions = factions
        self.rng = rng
        self.next_id = {table: self._first_free_id(table) for table in ("war_calls", "faction_messages")}
        for faction in factions:
            self._start_war(faction)

    def _start_war(self, faction: _Faction) -> None:
        # Keyed by the war's own id, which is what today's script joins `wars` on (id=eq.<war_id>).
        if any(row["id"] == faction.war_id for row in self.fake.rows("wars")):
            return
        row = {
            "id": faction.war_id,
            "war_id": faction.war_id,
            "faction_id": faction.id,
            "enemy_faction_id": self.rng.randint(1_000, 60_000),
            "is_active": True,
            "status": "active",
            "started_at": _now(),
            "created_at": _now(),
        }
        self.fake.insert("wars", row)

    def _first_free_id(self, table: str) -> int:
        return max([FIRST_ID - 1, *(int(row["id"]) for row in self.fake.rows(table))]) + 1

    def _take_id(self, table: str) -> int:
        self.next_id[table] += 1
        return self.next_id[table] - 1

    def step(self) -> None:
        faction = self.rng.choice(self.factions)
        if self.rng.random() < MESSAGE_SHARE:
            self._chat(faction)
            return
        calls = [row for row in self.fake.rows("war_calls") if row.get("faction_id") == faction.id]
        roll = self.rng.random() * MAX_OPEN_CALLS
        if not calls or roll > len(calls):
            self._call(faction, calls)
        elif self.rng.random() < 0.35:
            self._hand_over(faction, self.rng.choice(calls))
        else:
            self.fake.delete("war_calls", self.rng.choice(calls)["id"])  # hit, or given up

    def _call(self, faction: _Faction, calls: list[dict[str, Any]]) -> None:
        taken = {row.get("target_id") for row in calls}
        free = [enemy for enemy in faction.enemies if enemy.id not in taken] or faction.enemies
        target, caller = self.rng.choice(free), self.rng.choice(faction.members)
        row = {
            "id": self._take_id("war_calls"),
            "faction_id": faction.id,
            "war_id": faction.war_id,
            "target_id": target.id,
            "target_name": target.name,
            "caller_id": caller.id,
            "caller_name": caller.name,
            "created_at": _now(),
        }
        self.fake.insert("war_calls", row)

    def _hand_over(self, faction: _Faction, call: dict[str, Any]) -> None:
        caller = self.rng.choice(faction.members)
        self.fake.update("war_calls", call["id"], {"caller_id": caller.id, "caller_name": caller.name})

    def _chat(self, faction: _Faction) -> None:
        author = self.rng.choice(faction.members)
        text = self.rng.choice(_CHAT).format(
            name=self.rng.choice(faction.enemies).name, n=self.rng.randint(10, 2500)
        )
        row = {
            "id": self._take_id("faction_messages"),
            "faction_id": faction.id,
            "sender_id": author.id,
            "sender_name": author.name,
            "message": text,
            "created_at": _now(),
        }
        self.fake.insert("faction_messages", row)


async def generate_war_traffic(
    fake: FakeSupabase, faction_ids: Sequence[int], *, changes_per_s: float = 2.0, rng: random.Random
) -> None:
    """Start each faction's war (a `wars` row), then make war_calls and faction_messages changes on
    `fake`, `changes_per_s` on average, until cancelled."""
    if not faction_ids:
        raise ValueError("war traffic needs at least one faction")
    if changes_per_s <= 0:
        raise ValueError(f"changes_per_s must be positive, not {changes_per_s}")
    traffic = _Traffic(fake, [_faction(faction_id, rng) for faction_id in faction_ids], rng)
    while True:
        # Exponential gaps: changes arrive in bursts and lulls, as calls do in a real war.
        await trio.sleep(rng.expovariate(changes_per_s))
        traffic.step()
