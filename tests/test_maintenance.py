"""The maintenance schedule in virtual time; the pass itself against a real store."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import pytest
import trio

from relay.config import Config
from relay.maintenance import MaintenanceReport, maintenance_pass, run_schedule
from relay.service import RunningRelay, run_relay
from relay.storage.store import wall_clock_ms
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.supervisor import UpstreamState
from tests.helpers.factions import FACTION, OTHER_FACTION
from tests.helpers.waits import eventually


@pytest.mark.virtual_time
async def test_passes_run_on_a_fixed_grid(autojump_clock: trio.abc.Clock) -> None:
    started = trio.current_time()
    ran_at: list[float] = []

    async def slow_pass() -> None:
        ran_at.append(trio.current_time() - started)
        await trio.sleep(2.0)  # a slow pass must not push the next one back

    with trio.move_on_after(35.5):
        await run_schedule(10.0, slow_pass)
    assert ran_at == [10.0, 20.0, 30.0]


@pytest.mark.virtual_time
async def test_an_overrunning_pass_skips_the_missed_grid_points(autojump_clock: trio.abc.Clock) -> None:
    started = trio.current_time()
    ran_at: list[float] = []

    async def overrunning_pass() -> None:
        ran_at.append(trio.current_time() - started)
        if len(ran_at) == 1:
            await trio.sleep(25.0)

    with trio.move_on_after(45.5):
        await run_schedule(10.0, overrunning_pass)
    assert ran_at == [10.0, 40.0]


@pytest.mark.e2e
async def test_a_pass_trims_expires_closes_sockets_and_says_so(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    fake_upstream: FakeSupabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[retention]\nevents_per_faction = 3\n"))
    )
    with trio.fail_after(20):
        for faction_id in (FACTION, OTHER_FACTION):
            await relay.store.subscribe(faction_id)
            relay.supervisors.ensure_running(faction_id)
        await fake_upstream.wait_until(lambda: len(fake_upstream.connections) == 2)
        for n in range(5):
            await relay.store.append_events(FACTION, [("postgres_changes", {"n": n})])
        # A TTL of 0 expires activity older than now: some time must first pass since the last one.
        last_activity = max(relay.store.last_activity_at(f) or 0 for f in (FACTION, OTHER_FACTION))
        await eventually(lambda: wall_clock_ms() > last_activity)
        caplog.set_level(logging.INFO, logger="relay.maintenance")

        report = await maintenance_pass(relay.store, relay.factions, subscription_ttl_s=0.0)

        assert report == MaintenanceReport(events_trimmed=2, factions_expired=(OTHER_FACTION, FACTION))
        assert (await relay.store.counts())[FACTION].events_stored == 3
        assert relay.store.active_factions() == []
        assert {stats.state for stats in relay.supervisors.statistics().values()} == {UpstreamState.STOPPED}
        await fake_upstream.wait_until(lambda: not fake_upstream.connections)
        (line,) = [r.getMessage() for r in caplog.records if r.name == "relay.maintenance"]
        assert "trimmed 2 events, expired 2 factions" in line
        assert "checkpointed" in line
    relay.stop()
