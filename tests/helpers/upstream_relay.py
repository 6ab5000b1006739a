"""The relay end to end against the fake Supabase, for the upstream tests: start it with factions
subscribed, and read what its reconciles did and what it stores."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import httpx
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.storage.store import StoredEvent
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.supervisor import UpstreamStatistics
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.waits import eventually, eventually_holds

TIMEOUT_S = 20


def call(call_id: int, faction_id: int = FACTION, **extra: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "faction_id": faction_id,
        "target_id": 3_000 + call_id,
        "caller_name": "ann",
        **extra,
    }


async def start(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    toml: str = "",
    factions: tuple[int, ...] = (FACTION,),
) -> RunningRelay:
    relay: RunningRelay = await nursery.start(functools.partial(run_relay, make_config(toml)))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        for faction_id in factions:
            response = await http.post("/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY})
            assert response.status_code == 200
    return relay


def reconciles(relay: RunningRelay, faction_id: int = FACTION) -> int:
    stats = relay.supervisors.statistics()[faction_id].reconcile
    return stats.reconciles if stats is not None else 0


def rest_requests(relay: RunningRelay, faction_id: int = FACTION) -> int:
    stats = relay.supervisors.statistics()[faction_id].reconcile
    return stats.rest_requests if stats is not None else 0


def shared_deletes(relay: RunningRelay) -> UpstreamStatistics:
    stats = relay.supervisors.shared_deletes_statistics()
    assert stats is not None, "no faction has started the shared DELETE socket"
    return stats


async def rows(relay: RunningRelay, faction_id: int = FACTION) -> list[dict[str, Any]]:
    return (await relay.store.faction_state(faction_id)).tables["war_calls"]


async def until_ids(relay: RunningRelay, ids: list[int], faction_id: int = FACTION) -> None:
    """Until the faction's stored war_calls are these, in key order."""

    async def holds() -> bool:
        return [row["id"] for row in await rows(relay, faction_id)] == ids

    await eventually_holds(holds)


def fake_rows(fake: FakeSupabase, faction_id: int = FACTION) -> list[dict[str, Any]]:
    return sorted(
        (row for row in fake.rows("war_calls") if row["faction_id"] == faction_id), key=lambda r: r["id"]
    )


def changes(events: list[StoredEvent]) -> list[tuple[str, int, bool]]:
    found = []
    for event in events:
        data = event.data()
        row = data["old"] if data["eventType"] == "DELETE" else data["new"]
        found.append((data["eventType"], row["id"], data.get("resync", False)))
    return found


def applied(events: list[StoredEvent]) -> list[dict[str, Any]]:
    """What a client that applied the event stream (as today's script does) holds."""
    held: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event.data()
        if data["eventType"] == "DELETE":
            held.pop(data["old"]["id"], None)
        else:
            held[data["new"]["id"]] = data["new"]
    return [held[key] for key in sorted(held)]


def requested(relay: RunningRelay, faction_id: int = FACTION) -> int:
    stats = relay.supervisors.statistics()[faction_id].reconcile
    return stats.requested if stats is not None else 0


def reconciles_settled(
    relay: RunningRelay, factions: tuple[int, ...] = (FACTION,), at_least: int = 1
) -> bool:
    """The shared DELETE socket live (if there is one) and each faction reconciled `at_least` times with
    none running or asked for. The shared socket going live asks every faction for one more reconcile,
    so a count alone can be passed while the next one is still to come."""
    shared = relay.supervisors.shared_deletes_statistics()
    if shared is not None and shared.state != "connected":
        return False
    for faction_id in factions:
        stats = relay.supervisors.statistics()[faction_id].reconcile
        if stats is None or stats.reconciles < at_least or stats.due:
            return False
    return True


async def settled(relay: RunningRelay, *others: int) -> None:
    """Until every faction's first reconcile is done, the shared DELETE socket is live, and no
    reconcile is running or asked for."""
    await eventually(lambda: reconciles_settled(relay, (FACTION, *others)))
