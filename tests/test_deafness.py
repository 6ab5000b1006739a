"""Deaf channels (relay.upstream.deafness): the project's change capture stops, every channel stays
joined and answered, and the relay finds it with cheap probes and rejoins, for a busy faction and a
quiet one alike, without reading whole tables to find out.

Real loopback sockets and the real clock (the store uses worker threads), with the probe interval
and grace scaled down from 40 s and 10 s to 0.6 s and 0.3 s; every wait is bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.deafness import DeafStatistics
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION
from tests.helpers.upstream_relay import reconciles_settled
from tests.helpers.waits import eventually, eventually_holds

pytestmark = pytest.mark.e2e

TIMEOUT_S = 20
PROBES = "probe_interval_s = 0.6\nprobe_grace_s = 0.3\n"
BUSY, QUIET = FACTION, OTHER_FACTION


def call(call_id: int, faction_id: int) -> dict[str, Any]:
    return {"id": call_id, "faction_id": faction_id, "target_id": 3_000 + call_id, "caller_name": "ann"}


async def start(
    nursery: trio.Nursery, make_config: Callable[..., Config], toml: str = PROBES
) -> RunningRelay:
    relay: RunningRelay = await nursery.start(functools.partial(run_relay, make_config(toml)))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        for faction_id in (BUSY, QUIET):
            response = await http.post("/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY})
            assert response.status_code == 200
    return relay


def reconciles(relay: RunningRelay, faction_id: int) -> int:
    stats = relay.supervisors.statistics()[faction_id].reconcile
    return stats.reconciles if stats is not None else 0


def deafness(relay: RunningRelay) -> DeafStatistics:
    assert relay.services.deafness is not None
    return relay.services.deafness.statistics()


def full_reads(fake: FakeSupabase) -> int:
    """REST reads of whole rows (reconciles), as against probes, which select the key only."""
    return sum(1 for request in fake.rest_requests if ("select", "*") in request.query)


async def stored_ids(relay: RunningRelay, faction_id: int) -> list[int]:
    return [row["id"] for row in (await relay.store.faction_state(faction_id)).tables["war_calls"]]


async def busy_traffic(fake: FakeSupabase, first_id: int, stop: trio.Event) -> None:
    call_id = first_id
    while not stop.is_set():
        fake.insert("war_calls", call(call_id, BUSY))
        call_id += 1
        await trio.sleep(0.05)


@pytest.mark.parametrize("missed_by", [BUSY, QUIET])
async def test_a_deaf_project_is_found_by_probes_and_every_faction_rejoins(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase, missed_by: int
) -> None:
    relay = await start(nursery, make_config)
    stop_traffic = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: reconciles_settled(relay, (BUSY, QUIET)))
        counts_before = reconciles(relay, BUSY), reconciles(relay, QUIET)
        if missed_by == BUSY:
            nursery.start_soon(busy_traffic, fake_upstream, 100, stop_traffic)
            await eventually_holds(lambda: _has(relay, BUSY, 102))  # heard live
        await eventually(lambda: deafness(relay).rounds >= 1)
        reads_before, joins_before = full_reads(fake_upstream), fake_upstream.joins
        fake_upstream.stop_capture()
        missed_at = trio.current_time()
        fake_upstream.insert("war_calls", call(7, missed_by))  # the first change nobody hears
        await eventually(lambda: deafness(relay).deaf_found == 1)
        found_after_s = trio.current_time() - missed_at
        # Found by probes alone: no whole table was read to find it.
        assert full_reads(fake_upstream) == reads_before
        # Every faction rejoins (a cold start wiped every subscription), and hears again.
        await eventually(lambda: fake_upstream.joins >= joins_before + 2 * 3)
        await eventually(lambda: reconciles_settled(relay, (BUSY, QUIET), at_least=max(counts_before) + 1))
        await eventually_holds(lambda: _has(relay, missed_by, 7))  # healed by the rejoin's reconcile
        fake_upstream.insert("war_calls", call(8, QUIET))
        await eventually_holds(lambda: _has(relay, QUIET, 8))
        stop_traffic.set()
    # One round's interval, its grace, and the round's own requests: within 60 s at 40 s and 10 s.
    assert found_after_s < 0.6 + 0.3 + 2.0
    stats = deafness(relay)
    assert stats.rejoins == 2
    assert set(stats.last_factions) == {missed_by}
    assert fake_upstream.capture_restarts == 1
    events = (await relay.store.read_since(QUIET, None))[0]
    assert [(e.data()["new"]["id"], e.data().get("resync", False)) for e in events][-1] == (8, False)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        status = (await http.get("/status")).json()
        metrics = (await http.get("/metrics")).text
    assert status["deafness"]["deaf_found"] == 1
    assert status["deafness"]["last_found_at"] is not None
    assert "cat_relay_deaf_found_total 1.0" in metrics
    assert "cat_relay_deaf_rejoins_total 2.0" in metrics


async def test_a_busy_live_faction_is_never_taken_for_deaf_nor_reread(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    """Changes in flight at a probe differ from what was heard; they arrive during the grace."""
    relay = await start(nursery, make_config, "probe_interval_s = 0.2\nprobe_grace_s = 0.3\n")
    stop_traffic = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: reconciles_settled(relay, (BUSY, QUIET)))
        counts_before = reconciles(relay, BUSY), reconciles(relay, QUIET)
        reads_before = full_reads(fake_upstream)
        nursery.start_soon(busy_traffic, fake_upstream, 100, stop_traffic)
        rounds_before = deafness(relay).rounds
        await eventually(lambda: deafness(relay).rounds >= rounds_before + 10)
        stop_traffic.set()
    assert deafness(relay).deaf_found == 0
    assert full_reads(fake_upstream) == reads_before
    assert (reconciles(relay, BUSY), reconciles(relay, QUIET)) == counts_before
    assert deafness(relay).probe_requests > 0


async def _has(relay: RunningRelay, faction_id: int, call_id: int) -> bool:
    return call_id in await stored_ids(relay, faction_id)
