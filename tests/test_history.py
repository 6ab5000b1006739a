"""A faction that starts with history (hundreds of rows per table) on a project whose PostgREST caps
reads below that (`db-max-rows`): the relay holds every row, and its probes agree with upstream.

Real loopback sockets and the real clock (the store uses worker threads); every wait is bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import httpx
import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.upstream_relay import reconciles_settled
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e

TIMEOUT_S = 30
HISTORY_ROWS = 300


def reconciles(relay: RunningRelay) -> int:
    stats = relay.supervisors.statistics()[FACTION].reconcile
    return stats.reconciles if stats is not None else 0


async def test_history_under_a_max_rows_cap_is_read_whole_and_probes_agree_with_it(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    fake_upstream.seed_history(FACTION, HISTORY_ROWS)
    fake_upstream.rest_max_rows = 120  # below the faction's 300 rows per table
    config = make_config("probe_interval_s = 0.3\nprobe_grace_s = 0.2\n")
    relay: RunningRelay = await nursery.start(functools.partial(run_relay, config))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        answer = await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
        assert answer.status_code == 200
    assert relay.services.deafness is not None
    deafness = relay.services.deafness
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: reconciles_settled(relay))
        settled_reconciles = reconciles(relay)
        rounds = deafness.statistics().rounds
        await eventually(lambda: deafness.statistics().rounds >= rounds + 3)
    state = await relay.store.faction_state(FACTION)
    for table in ("war_calls", "faction_messages"):
        upstream = sorted(row["id"] for row in fake_upstream.rows(table) if row["faction_id"] == FACTION)
        assert [row["id"] for row in state.tables[table]] == upstream
        assert len(upstream) == HISTORY_ROWS
    stats = relay.supervisors.statistics()[FACTION].reconcile
    assert stats is not None
    # 300 rows in pages of 120: three requests per table with history, one for the empty `wars`; the
    # relay-wide DELETE socket going live may have asked for a second reconcile.
    assert stats.rest_requests == (3 + 3 + 1) * settled_reconciles
    # The probes agree with what the reads found: no rejoin, no reconcile.
    assert (deafness.statistics().deaf_found, reconciles(relay)) == (0, settled_reconciles)


async def test_a_factions_history_is_its_state_not_a_burst_of_events(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    """Today's script makes an active call of every war_calls INSERT and a notification of every
    message: the first read of a faction with history is its baseline. What changes after is live."""
    fake_upstream.seed_history(FACTION, HISTORY_ROWS)
    relay: RunningRelay = await nursery.start(functools.partial(run_relay, make_config()))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        answer = await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
        assert answer.status_code == 200
        with trio.fail_after(TIMEOUT_S):
            await eventually(lambda: reconciles_settled(relay))
            polled = (await http.get("/events", params={"faction_id": FACTION})).json()
            state = (await http.get("/state", params={"faction_id": FACTION})).json()
            assert polled["events"] == []
            assert (
                len(state["tables"]["war_calls"]) == len(state["tables"]["faction_messages"]) == HISTORY_ROWS
            )
            call = {"id": 1, "faction_id": FACTION, "target_id": 3001, "caller_name": "ann"}
            fake_upstream.insert("war_calls", call)
            await eventually(lambda: relay.store.kept_count(FACTION) == 1)
            after = (
                await http.get("/events", params={"faction_id": FACTION, "since": polled["timestamp"]})
            ).json()
    ((event_type, new),) = [(e["data"]["eventType"], e["data"]["new"]) for e in after["events"]]
    assert (event_type, new["id"]) == ("INSERT", 1)
