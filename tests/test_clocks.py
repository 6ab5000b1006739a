"""The wall clock stepping under a relay (issue 16 point 3), through the HTTP contract: the advice to
pollers and the cursors members carry from one instance to another. Expiry under a stepped clock is the
store's (`tests/test_store.py`); the clocks are the test's (`tests/helpers/clocks.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from relay.maintenance import maintenance_pass
from relay.service import BuiltRelay
from tests.helpers.clocks import DAY_MS, Clocks, open_clocked_relay
from tests.helpers.factions import ANON_KEY, FACTION

pytestmark = pytest.mark.contract

TEST_TIMEOUT_S = 10
TTL_S = 1800.0


async def subscribe(relay: BuiltRelay) -> None:
    response = await relay.app.test_client().post(
        "/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY}
    )
    assert response.status_code == 200


async def poll(relay: BuiltRelay, since: int) -> tuple[int, Any]:
    response = await relay.app.test_client().get(f"/events?faction_id={FACTION}&since={since}")
    return response.status_code, await response.get_json()


def published(n: int) -> list[tuple[str, Any]]:
    return [("hospital_update", {"n": n})]


async def test_next_poll_ms_is_right_after_the_wall_clock_steps_back(tmp_path: Path) -> None:
    clocks = Clocks()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_clocked_relay(tmp_path, clocks) as relay:
            await subscribe(relay)
            clocks.now_ms += DAY_MS  # a day ahead while the event is stamped...
            (event,) = await relay.store.append_events(FACTION, published(1))
            clocks.now_ms -= DAY_MS  # ...then corrected: stamps stay a day ahead until it catches up
            _, body = await poll(relay, event.timestamp)
            assert body["next_poll_ms"] == 1_000
            clocks.elapse(61_000)
            _, body = await poll(relay, event.timestamp)
            assert body["next_poll_ms"] == 3_000
            clocks.elapse(600_000)
            _, body = await poll(relay, event.timestamp)
            assert body["next_poll_ms"] == 10_000
            (later,) = await relay.store.append_events(FACTION, published(2))
            assert later.timestamp > event.timestamp  # cursors keep increasing
            _, body = await poll(relay, event.timestamp)
            assert (body["next_poll_ms"], body["timestamp"]) == (1_000, later.timestamp)


async def test_a_wall_clock_stepping_forward_leaves_a_polled_faction_subscribed(tmp_path: Path) -> None:
    clocks = Clocks()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with open_clocked_relay(tmp_path, clocks) as relay:
            await subscribe(relay)
            clocks.now_ms += 3 * DAY_MS
            report = await maintenance_pass(relay.store, relay.factions, subscription_ttl_s=TTL_S)
            assert report.factions_expired == ()
            clocks.elapse(int(TTL_S * 1000) + 1)
            report = await maintenance_pass(relay.store, relay.factions, subscription_ttl_s=TTL_S)
            assert report.factions_expired == (FACTION,)


async def test_a_cursor_from_another_instance_on_the_same_stepped_clock_is_accepted(tmp_path: Path) -> None:
    clocks = Clocks()  # one machine, two instances behind nginx
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            open_clocked_relay(tmp_path / "a", clocks) as busy,
            open_clocked_relay(tmp_path / "b", clocks) as idle,
        ):
            await subscribe(busy)
            await subscribe(idle)
            clocks.now_ms += DAY_MS
            for n in range(3):
                await maintenance_pass(idle.store, idle.factions, subscription_ttl_s=TTL_S)
                clocks.elapse(100_000)  # the idle one's clock was written down before this event
                (stamped,) = await busy.store.append_events(FACTION, published(n))
            cursor = stamped.timestamp  # what the member's script holds when its instance goes away
            clocks.now_ms -= DAY_MS
            status, body = await poll(idle, cursor)
            assert (status, body["events"]) == (200, [])
            assert body["timestamp"] >= cursor
            (taken_over,) = await idle.store.append_events(FACTION, published(3))
            status, body = await poll(idle, cursor)
            assert [event["id"] for event in body["events"]] == [taken_over.id]
            # Still refused: a since far ahead of what any instance on this clock handed out.
            status, body = await poll(idle, cursor + DAY_MS)
            assert (status, body["code"]) == (400, "invalid_since")
