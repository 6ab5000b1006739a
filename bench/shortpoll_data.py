"""The short-polling benchmark's data set and request mix, the same for every server.

The data set is made by the relay's own store, so the relay holds it as it would in production
(subscribed factions, events and faction rows in its database): `seed_relay_database` writes it
before the relay starts and returns the events exactly as the relay serves them, which
`write_seed_file` hands to the Node peer (same bytes) and to the seeded fake upstream (the rows, so
the relay's reconcile finds nothing to change). Deterministic but for the relay's stamps, which
come from its clock, spread over the last hour.

The request mix (`request_mix`): per faction, 90 % empty polls (since = its newest stamp) and 10 %
returning 1 to 5 events (since = the stamp of the event 1 to 5 before the newest), shuffled with a
fixed seed. Each path comes with the events it must return, so a sample can be checked per server.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relay.config import Config
from relay.storage.store import open_store

SEED = 6  # issue 6
FIRST_ROW_ID = 1_000
# Ranked war traffic as CAT sees it: player ids below ~3.5 million, war ids in the tens of thousands.
PLAYER_IDS = (100_000, 3_500_000)
WAR_IDS = (20_000, 40_000)
NAME_STARTS = ("Dark", "Iron", "Toxic", "Lucky", "Silent", "Vodka", "Neon", "Rusty", "Savage", "Crimson")
NAME_ENDS = ("Wolf", "Fist", "Blade", "Bunny", "Viper", "Reaper", "Mugger", "Ghost", "Bandit", "Tiger")
# The seeded events' created_at: a fixed war start, so the data set is the same on every run.
WAR_STARTED = datetime(2026, 11, 24, 15, 0, 0, tzinfo=UTC)
# The relay's stamps for the seeded events: spread over the hour before the run, newest a minute
# ago, as a faction at war would have them.
STAMPED_OVER_MS = 3_600_000
NEWEST_AGO_MS = 60_000
POLLS_PER_FACTION = 100  # of which NONEMPTY_PER_FACTION return events: 10 %
NONEMPTY_PER_FACTION = 10
MAX_EVENTS_PER_POLL = 5


@dataclass(frozen=True)
class SeededEvent:
    timestamp: int
    json: str  # as the relay serves it in /events


@dataclass(frozen=True)
class Poll:
    path: str
    faction_id: int
    expected: tuple[SeededEvent, ...]  # what it must return, oldest first


def _name(rng: random.Random) -> str:
    name = rng.choice(NAME_STARTS) + rng.choice(NAME_ENDS)
    return name + str(rng.randint(1, 999)) if rng.random() < 0.5 else name


def war_call_insert(row_id: int, faction_id: int, war_id: int, at: datetime, rng: random.Random) -> Any:
    """A war_calls INSERT in the realtime-js shape the relay stores (`relay.upstream.phoenix.to_realtime_js`)."""
    row = {
        "id": row_id,
        "faction_id": faction_id,
        "war_id": war_id,
        "target_id": rng.randint(*PLAYER_IDS),
        "target_name": _name(rng),
        "caller_id": rng.randint(*PLAYER_IDS),
        "caller_name": _name(rng),
        "created_at": at.isoformat(),  # Postgres's timestamptz through to_jsonb: µs and an offset
    }
    return {
        "schema": "public",
        "table": "war_calls",
        "commit_timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
        "eventType": "INSERT",
        "new": row,
        "old": {},
        "errors": None,
    }


def _seeding_clock(events: int) -> Callable[[], int]:
    """Stamps spread evenly over the last hour: the store stamps each event max(clock, previous + 1)."""
    step = STAMPED_OVER_MS // max(1, events)
    first = time.time_ns() // 1_000_000 - NEWEST_AGO_MS - step * events
    ticks = iter(range(first, first + step * (events + 1), step))
    return lambda: next(ticks, first + step * events)


async def seed_relay_database(
    config: Config, factions: Sequence[int], per_faction: int
) -> dict[int, list[SeededEvent]]:
    """Subscribe `factions` and store `per_faction` war calls each, round-robin over the factions (as
    a war's calls arrive), in the relay's database at `config.storage.path`; the events as served."""
    rng = random.Random(SEED)
    war_ids = {faction_id: rng.randint(*WAR_IDS) for faction_id in factions}
    seeded: dict[int, list[SeededEvent]] = {faction_id: [] for faction_id in factions}
    async with open_store(
        config.storage.path,
        retention=config.retention,
        now_ms=_seeding_clock(len(factions) * per_faction),
        key_columns=config.upstream.key_columns,
    ) as store:
        for faction_id in factions:
            await store.subscribe(faction_id)
        row_id = FIRST_ROW_ID
        for round_number in range(per_faction):
            for faction_id in factions:
                at = WAR_STARTED + timedelta(seconds=round_number * 30, milliseconds=rng.randint(0, 29_999))
                data = war_call_insert(row_id, faction_id, war_ids[faction_id], at, rng)
                row_id += 1
                (stored,) = await store.append_events(faction_id, [("postgres_changes", data)])
                seeded[faction_id].append(SeededEvent(stored.timestamp, stored.json))
    return seeded


def write_seed_file(seeded: dict[int, list[SeededEvent]], path: Path) -> None:
    """`{"<faction_id>": [<event>, ...]}` with each event's bytes exactly as the relay serves them."""
    parts = [
        f'"{faction_id}":[{",".join(event.json for event in events)}]'
        for faction_id, events in seeded.items()
    ]
    path.write_text("{" + ",".join(parts) + "}")


def request_mix(seeded: dict[int, list[SeededEvent]]) -> list[Poll]:
    """Every faction equally often; per faction 90 % empty polls and 10 % returning 1..5 events (each
    count equally often), in a fixed shuffled order."""
    polls: list[Poll] = []
    for faction_id, events in seeded.items():
        if len(events) <= MAX_EVENTS_PER_POLL:
            raise ValueError(f"faction {faction_id} has {len(events)} events, needs > {MAX_EVENTS_PER_POLL}")
        counts = [0] * (POLLS_PER_FACTION - NONEMPTY_PER_FACTION)
        counts += [1 + n % MAX_EVENTS_PER_POLL for n in range(NONEMPTY_PER_FACTION)]
        for count in counts:
            since = events[-1 - count].timestamp
            expected = tuple(events[len(events) - count :]) if count else ()
            polls.append(Poll(f"/events?faction_id={faction_id}&since={since}", faction_id, expected))
    random.Random(SEED).shuffle(polls)
    return polls


def write_paths(polls: Sequence[Poll], path: Path) -> None:
    path.write_text("".join(f"{poll.path}\n" for poll in polls))


def check_answer(poll: Poll, status: int, body: bytes) -> str | None:
    """Why an answer to `poll` is wrong (events not byte-identical to the relay's), or None."""
    if status != 200:
        return f"{poll.path}: status {status}: {body[:200]!r}"
    answer = json.loads(body)
    events = '"events":[' + ",".join(event.json for event in poll.expected) + "]"
    if events.encode() not in body:
        got = len(answer.get("events", []))
        return f"{poll.path}: {got} events, expected {len(poll.expected)} byte-identical to the relay's"
    if poll.expected and answer.get("timestamp") != poll.expected[-1].timestamp:
        return f"{poll.path}: timestamp {answer.get('timestamp')}, expected {poll.expected[-1].timestamp}"
    return None


def mean_event_bytes(seeded: dict[int, list[SeededEvent]]) -> float:
    sizes = [len(event.json.encode()) for events in seeded.values() for event in events]
    return sum(sizes) / len(sizes)
