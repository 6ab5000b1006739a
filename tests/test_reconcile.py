"""Healing upstream gaps end to end: the relay against the fake's Realtime socket and its REST reads.

Real loopback sockets and the real clock (the store uses worker threads); every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import trio

from relay.config import Config
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION
from tests.helpers.upstream_relay import (
    TIMEOUT_S,
    applied,
    call,
    changes,
    fake_rows,
    reconciles,
    rest_requests,
    rows,
    settled,
    shared_deletes,
    start,
    until_ids,
)
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e


async def test_changes_made_while_the_socket_was_down_arrive_as_resync_events(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    # The shared DELETE socket asks every faction for a reconcile each time it is live: live before
    # this faction is subscribed, and kept up through the outage, it adds none to the ones counted here.
    relay = await start(nursery, make_config, factions=(OTHER_FACTION,))
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: shared_deletes(relay).state == "connected")
        async with httpx.AsyncClient(base_url=relay.url) as http:
            subscribed = await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
            assert subscribed.status_code == 200
        await eventually(lambda: reconciles(relay) == 1)
        for n in (1, 2, 3):
            fake_upstream.insert("war_calls", call(n))
        await until_ids(relay, [row["id"] for row in fake_rows(fake_upstream)])
        sockets = fake_upstream.connections_with(str(FACTION))
        fake_upstream.freeze(sockets)  # the outage: nothing delivered from here
        fake_upstream.insert("war_calls", call(4), deliver=False)
        fake_upstream.update("war_calls", 2, {"caller_name": "bob"}, deliver=False)
        fake_upstream.delete("war_calls", 1, deliver=False)
        fake_upstream.insert("war_calls", call(9, OTHER_FACTION), deliver=False)  # not ours
        requests_before = rest_requests(relay)
        fake_upstream.drop_connections(only=sockets)
        await eventually(lambda: reconciles(relay) == 2)
    events = (await relay.store.read_since(FACTION, None))[0]
    assert changes(events)[3:] == [("DELETE", 1, True), ("UPDATE", 2, True), ("INSERT", 4, True)]
    assert events[3].data()["old"] == call(1)  # today's script reads old.target_id
    assert events[4].data()["old"] == call(2)
    assert await rows(relay) == fake_rows(fake_upstream) == applied(events)
    # One REST read per configured table (war_calls, faction_messages, wars), each a single page.
    assert rest_requests(relay) - requests_before == 3
    stats = relay.supervisors.statistics()[FACTION].reconcile
    assert stats is not None
    assert (stats.last_differences, stats.last_error) == (3, None)
    async with httpx.AsyncClient(base_url=relay.url) as http:
        state = (await http.get("/state", params={"faction_id": FACTION})).json()
        status = (await http.get("/status")).json()
    assert state["tables"]["war_calls"] == fake_rows(fake_upstream)
    (faction,) = [f for f in status["factions"] if f["faction_id"] == FACTION]
    assert faction["reconcile"]["differences"] == 3
    assert faction["reconcile"]["last_at"] is not None


async def test_a_live_change_during_the_snapshot_read_is_neither_lost_nor_reverted(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    # FULL: the DELETE comes on the faction's own channel (tests/test_shared_delete_gaps.py has the
    # DEFAULT identity's version, where it comes on the shared socket for a row not held yet).
    fake_upstream.define_table("war_calls", replica_identity="full")
    relay = await start(nursery, make_config)
    with trio.fail_after(TIMEOUT_S):
        await settled(relay)  # the baseline, of an empty table
        sockets = fake_upstream.connections_with(str(FACTION))
        fake_upstream.freeze(sockets)  # an outage, during which rows 1 and 2 are written
        fake_upstream.insert("war_calls", call(1), deliver=False)
        fake_upstream.insert("war_calls", call(2), deliver=False)
        fake_upstream.rest_hold = trio.Event()
        reads, done = fake_upstream.rest_request_count, reconciles(relay)
        fake_upstream.drop_connections(only=sockets)
        # The reconnected faction's snapshot of war_calls is read (rows 1 and 2), its answer held...
        await fake_upstream.wait_until(lambda: fake_upstream.rest_request_count == reads + 1)
        # ...while live changes race it: a new row, and the deletion of a row the snapshot holds.
        fake_upstream.insert("war_calls", call(3))
        fake_upstream.delete("war_calls", 2)
        await eventually(lambda: relay.store.kept_count(FACTION) == 2)
        fake_upstream.rest_hold.set()
        await eventually(lambda: reconciles(relay) == done + 1)
    events = (await relay.store.read_since(FACTION, None))[0]
    # Row 1 was missing and comes as resync; 3 and 2 changed live, so the snapshot leaves them alone.
    assert changes(events) == [("INSERT", 3, False), ("DELETE", 2, False), ("INSERT", 1, True)]
    assert await rows(relay) == fake_rows(fake_upstream) == applied(events) == [call(1), call(3)]


async def test_a_delete_under_the_default_replica_identity_reaches_its_faction_by_key(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    fake_upstream.define_table("war_calls", replica_identity="default")
    relay = await start(nursery, make_config, factions=(FACTION, OTHER_FACTION))
    with trio.fail_after(TIMEOUT_S):
        # At least: the shared socket going live may ask each for one more, which finds nothing.
        await eventually(lambda: reconciles(relay, FACTION) >= 1 and reconciles(relay, OTHER_FACTION) >= 1)
        await eventually(lambda: shared_deletes(relay).state == "connected")
        fake_upstream.insert("war_calls", call(1))
        fake_upstream.insert("war_calls", call(2, OTHER_FACTION))
        await until_ids(relay, [1])
        await until_ids(relay, [2], OTHER_FACTION)
        fake_upstream.delete("war_calls", 1)  # old_record is {"id": 1}: no faction filter matches it
        await until_ids(relay, [])
    (_, delete) = (await relay.store.read_since(FACTION, None))[0]
    assert delete.data()["eventType"] == "DELETE"
    assert delete.data()["old"] == call(1)  # completed from the stored row
    assert changes((await relay.store.read_since(OTHER_FACTION, None))[0]) == [("INSERT", 2, False)]
    # One shared socket carries the DELETE subscription: three connections for two factions.
    assert len(fake_upstream.connections) == 3


async def test_a_delete_on_two_channels_is_stored_once(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    # REPLICA IDENTITY FULL, so the faction's own channel gets each DELETE too.
    fake_upstream.define_table("war_calls", replica_identity="full")
    relay = await start(nursery, make_config)
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: reconciles(relay) == 1)
        await eventually(lambda: shared_deletes(relay).state == "connected")
        fake_upstream.insert("war_calls", call(1))
        await until_ids(relay, [1])
        fake_upstream.delete("war_calls", 1)
        fake_upstream.insert("war_calls", call(2))  # a later change: both DELETE copies came before it
        await until_ids(relay, [2])
        # The shared socket's copy, counted once it was handled: had it been routed, it would be stored.
        await eventually(lambda: shared_deletes(relay).changes_received == 1)
    assert changes((await relay.store.read_since(FACTION, None))[0]) == [
        ("INSERT", 1, False),
        ("DELETE", 1, False),
        ("INSERT", 2, False),
    ]


async def test_a_failing_rest_read_is_retried_shown_and_never_holds_up_live_events(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    fake_upstream.insert("war_calls", call(1), deliver=False)
    fake_upstream.fail_rest(503)
    # The periodic reconcile of a relay without deafness probes.
    relay = await start(nursery, make_config, "reconcile_interval_s = 0.3\nprobe_interval_s = 0\n")
    with trio.fail_after(TIMEOUT_S):
        await fake_upstream.wait_until(lambda: fake_upstream.rest_request_count >= 2)  # retried
        stats = relay.supervisors.statistics()[FACTION].reconcile
        assert stats is not None
        assert stats.last_error == "reading war_calls: HTTP 503: scripted failure"
        fake_upstream.insert("war_calls", call(2))  # live changes flow meanwhile
        await until_ids(relay, [2])
        fake_upstream.accept_rest()
        await eventually(lambda: reconciles(relay) >= 1)
        assert [row["id"] for row in await rows(relay)] == [1, 2]
        # Periodic: a change the socket never delivered is found by the next pass on its own.
        fake_upstream.insert("war_calls", call(3), deliver=False)
        await until_ids(relay, [1, 2, 3])
    stats = relay.supervisors.statistics()[FACTION].reconcile
    assert stats is not None
    assert stats.last_error is None
    assert stats.rest_requests >= 4
