"""Upstream floods (issue 16 point 2): the reader never waits for the store, heartbeats are answered
under any flood, a flood the relay keeps up with loses nothing, and one beyond the backlog drops the
oldest changes, counted, logged once, marked `truncated` for the members and repaired by a reconcile.

The virtual-time tests hold the sink up as a busy store would (no worker thread: the autojump clock
must not see one); the end-to-end ones flood the real relay and its real store over loopback.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import relay.service
from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.traffic import Source
from relay.upstream.backoff import Backoff
from relay.upstream.connection import MAX_BATCH_CHANGES
from relay.upstream.reconcile import Reconciler
from relay.upstream.snapshot import Snapshot
from relay.upstream.supervisor import Supervisors, SupervisorSettings, UpstreamState
from tests.helpers.factions import FACTION
from tests.helpers.flood import HeldSink, change_number, numbered_calls, stored
from tests.helpers.supervisors import KEY, war_calls_settings
from tests.helpers.userscript import Userscript, read_status, wait_reconciled
from tests.helpers.waits import eventually

A = 46666
SUPERVISOR_LOG = "relay.upstream.supervisor"


def small_backlog(settings: SupervisorSettings, changes: int) -> SupervisorSettings:
    return dataclasses.replace(
        settings, connection=dataclasses.replace(settings.connection, max_buffered_changes=changes)
    )


async def start_held(
    nursery: trio.Nursery, fake: FakeSupabase, sink: HeldSink, settings: SupervisorSettings
) -> tuple[Supervisors, list[int]]:
    lost: list[int] = []
    supervisors = Supervisors(
        settings, sink.ingest, rng=random.Random(4), wall_clock_ms=lambda: 0, on_lost=lost.append
    )
    await nursery.start(supervisors.run, [A])
    await eventually(lambda: supervisors.statistics()[A].state == UpstreamState.CONNECTED)
    return supervisors, lost


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeSupabase:
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    return fake


@pytest.mark.virtual_time
async def test_heartbeats_are_answered_while_the_store_holds_delivery_up(
    fake: FakeSupabase, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Before the reader and the deliverer were apart, a reply queued behind changes was read only
    once the store took them, and the socket was declared dead after one heartbeat interval."""
    sink = HeldSink()
    with trio.fail_after(600):
        supervisors, _ = await start_held(nursery, fake, sink, war_calls_settings(fake.url))
        (connection,) = fake.connections
        before = connection.heartbeats
        nursery.start_soon(
            functools.partial(fake.flood, "war_calls", numbered_calls(A, 500), 3_000, per_second=20)
        )
        # Five intervals with the sink held all along; looking once a second is plenty in virtual time.
        await eventually(lambda: connection.heartbeats >= before + 5, step_s=1.0)
        stats = supervisors.statistics()[A]
        assert (sink.entered, sink.batches) == (1, [])
        assert (stats.state, stats.reconnects, stats.last_error) == (UpstreamState.CONNECTED, 0, None)
        assert (stats.heartbeat_round_trip_s or 0.0) < 1.0
        assert stats.heartbeat_round_trip_s is not None
        assert fake.connections == [connection]
        sink.open.set()
        await eventually(lambda: sink.taken() == 3_000, step_s=1.0)
    assert sink.numbers() == list(range(3_000))  # in order, nothing dropped
    # The one held all along, then what piled up meanwhile (over 2,000 changes) in the largest batches
    # a delivery takes, then the rest of the flood as it was read.
    assert [len(batch) for batch in sink.batches[:3]] == [1, MAX_BATCH_CHANGES, MAX_BATCH_CHANGES]
    assert supervisors.statistics()[A].changes_dropped == 0


@pytest.mark.virtual_time
async def test_a_burst_beyond_the_backlog_drops_the_oldest_counts_them_and_warns_once(
    fake: FakeSupabase,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = HeldSink()
    caplog.set_level(logging.INFO, logger=SUPERVISOR_LOG)
    with trio.fail_after(600):
        supervisors, lost = await start_held(
            nursery, fake, sink, small_backlog(war_calls_settings(fake.url), 10)
        )
        row_at = numbered_calls(A, 20)
        fake.upsert("war_calls", row_at(0))
        await eventually(lambda: sink.entered == 1)  # change 0 taken, the deliverer held
        await fake.flood("war_calls", lambda n: row_at(n + 1), 50)  # changes 1..50, a burst
        await eventually(lambda: supervisors.statistics()[A].changes_dropped == 40)
        assert set(lost) == {A}  # the faction marked for its members
        sink.open.set()
        await eventually(lambda: sink.taken() == 11)
        await eventually(lambda: "flood over" in caplog.text)
    assert sink.numbers() == [0, *range(41, 51)]  # the newest ten kept, in order
    stats = supervisors.statistics()[A]
    assert (stats.state, stats.reconnects, stats.changes_received) == (UpstreamState.CONNECTED, 0, 11)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "flood" in warnings[0].getMessage()
    assert "40 change(s) dropped" in caplog.text
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.virtual_time
async def test_a_change_waiting_in_the_backlog_keeps_its_key_out_of_a_reconcile_in_flight(
    fake: FakeSupabase, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The reconciler hears of a change when it is read, not when it is stored: a snapshot read that
    ends while the change still waits for the (busy) store must leave its row alone."""
    sink, release, reading = HeldSink(), trio.Event(), trio.Event()
    skipped: list[frozenset[Any]] = []

    async def read(table: str, realtime_filter: str, key: str) -> Snapshot:
        reading.set()
        await release.wait()
        return Snapshot(rows=[], requests=1)

    async def apply(faction_id: int, table: str, rows: Any, skip: AbstractSet[Any], read_at: str) -> int:
        skipped.append(frozenset(skip))
        return 0

    settings = war_calls_settings(fake.url)
    reconciler = Reconciler(
        A,
        settings.channels,
        read,
        apply,
        interval_s=3600.0,
        backoff=Backoff(1.0, 60.0, random.Random(1)),
        wall_clock_ms=lambda: 0,
    )
    supervisors = Supervisors(
        settings,
        sink.ingest,
        rng=random.Random(4),
        wall_clock_ms=lambda: 0,
        reconciler_for=lambda _: reconciler,
    )
    with trio.fail_after(60):
        await nursery.start(supervisors.run, [A])
        await reading.wait()
        fake.upsert("war_calls", numbered_calls(A, 10)(7))  # row 8
        await eventually(lambda: sink.entered == 1)  # read, and held before the store
        release.set()
        await eventually(lambda: bool(skipped))
    assert skipped == [frozenset({8})]
    assert sink.batches == []


# --- end to end: the real relay, its store, HTTP, the reconcile ---------------------------------


@pytest.fixture
async def flood_relay(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[RunningRelay]:
    """The relay with every event of a test retained, and, when the test is parametrised with one,
    a backlog of `request.param` changes: small, so that a burst outruns the real store."""
    backlog = getattr(request, "param", None)
    if backlog is not None:
        settings_of = relay.service.supervisor_settings
        monkeypatch.setattr(
            relay.service, "supervisor_settings", lambda config: small_backlog(settings_of(config), backlog)
        )
    config = make_config("[retention]\nevents_per_faction = 20000\n")
    async with trio.open_nursery() as nursery:
        running: RunningRelay = await nursery.start(functools.partial(run_relay, config))
        yield running
        running.stop()


async def poll_all(http: httpx.AsyncClient, since: int) -> tuple[list[dict[str, Any]], bool]:
    """Every event after `since`, and whether any answer said `truncated`."""
    events: list[dict[str, Any]] = []
    truncated = False
    while True:
        body = (await http.get("/events", params={"faction_id": FACTION, "since": since})).json()
        truncated = truncated or body.get("truncated", False)
        if not body["events"]:
            return events, truncated
        events.extend(body["events"])
        since = body["timestamp"]


def by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row["id"])


def upstream_stats(running: RunningRelay) -> Any:
    return running.supervisors.statistics()[FACTION]


@pytest.mark.e2e
async def test_a_flood_the_relay_keeps_up_with_stores_every_change_in_order(
    flood_relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=flood_relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_reconciled(http, FACTION)
            since = flood_relay.store.cursor()
            await fake_upstream.flood("war_calls", numbered_calls(FACTION, 300), 3_000, per_second=1_000)
            await eventually(lambda: stored(flood_relay, Source.UPSTREAM) == 3_000)
            events, truncated = await poll_all(http, since)
    assert [change_number(event["data"]) for event in events] == list(range(3_000))
    assert not truncated
    stats = upstream_stats(flood_relay)
    assert (stats.changes_dropped, stats.reconnects, stats.last_error) == (0, 0, None)


@pytest.mark.e2e
@pytest.mark.parametrize("flood_relay", [20], indirect=True)
async def test_a_flood_beyond_the_backlog_drops_oldest_marks_truncated_and_is_reconciled(
    flood_relay: RunningRelay, fake_upstream: FakeSupabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keys, count = 1_500, 2_000  # the inserts of keys 501..1500 are never touched again
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=flood_relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_reconciled(http, FACTION)
            since = flood_relay.store.cursor()
            reconciled_before = stored(flood_relay, Source.RECONCILE)
            reconciles_before = (await read_status(http))["factions"][0]["reconcile"]["reconciles"]
            await fake_upstream.flood("war_calls", numbered_calls(FACTION, keys), count)  # a burst
            await eventually(lambda: "flood over" in caplog.text)
            await eventually(lambda: upstream_stats(flood_relay).reconcile.reconciles > reconciles_before)
            answer = (await http.get("/events", params={"faction_id": FACTION, "since": since})).json()
            state = (await http.get("/state", params={"faction_id": FACTION})).json()
            metrics = (await http.get("/metrics")).text
            events, _ = await poll_all(http, since)
    stats = upstream_stats(flood_relay)
    dropped, kept = stats.changes_dropped, stored(flood_relay, Source.UPSTREAM)
    assert dropped > 0
    assert dropped + kept == count  # counted: none lost silently
    assert f'cat_relay_upstream_changes_dropped_total{{faction_id="{FACTION}"}} {dropped}.0' in metrics
    live = [change_number(e["data"]) for e in events if not e["data"].get("resync")]
    assert live == sorted(live)  # in order
    assert live[-1] == count - 1  # the newest kept
    assert answer["truncated"] is True  # a member behind the flood reloads /state
    assert by_id(state["tables"]["war_calls"]) == by_id(fake_upstream.rows("war_calls"))
    resyncs = stored(flood_relay, Source.RECONCILE) - reconciled_before
    assert 0 < resyncs <= keys  # at most one per changed row
    assert (stats.state, stats.reconnects, stats.last_error) == (UpstreamState.CONNECTED, 0, None)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == [SUPERVISOR_LOG], [r.getMessage() for r in warnings]
    assert not any(r.exc_info for r in caplog.records)
