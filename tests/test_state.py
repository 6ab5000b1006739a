"""Faction state over HTTP: `/state` and its cursor, and the `truncated` signal on `/events` and SSE."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence

import httpx
import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.sse_client import open_sse
from tests.helpers.waits import eventually, eventually_holds

pytestmark = pytest.mark.e2e


async def start(nursery: trio.Nursery, make_config: Callable[..., Config], toml: str = "") -> RunningRelay:
    relay: RunningRelay = await nursery.start(functools.partial(run_relay, make_config(toml)))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        subscribed = await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
        assert subscribed.status_code == 200
    return relay


def shared_deletes_state(relay: RunningRelay) -> str | None:
    stats = relay.supervisors.shared_deletes_statistics()
    return None if stats is None else stats.state


async def war_calls_are(relay: RunningRelay, rows: Sequence[Mapping[str, object]]) -> bool:
    return (await relay.store.faction_state(FACTION)).tables["war_calls"] == rows


async def test_state_then_events_since_its_cursor_miss_nothing_and_double_nothing(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    relay = await start(nursery, make_config)
    first = {"id": 1, "faction_id": FACTION, "target_id": 3001}
    second = {"id": 2, "faction_id": FACTION, "target_id": 3002}
    with trio.fail_after(10):
        await eventually(lambda: relay.supervisors.statistics()[FACTION].state == "connected")
        # Under the default replica identity the DELETE comes only through the shared socket.
        await eventually(lambda: shared_deletes_state(relay) == "connected")
        fake_upstream.insert("war_calls", first)
        fake_upstream.insert("war_calls", second)
        fake_upstream.delete("war_calls", 1)
        await eventually_holds(lambda: war_calls_are(relay, [second]))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        response = await http.get("/state", params={"faction_id": FACTION})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        state = response.json()
        assert state == {
            "faction_id": FACTION,
            "timestamp": relay.store.cursor(),
            "tables": {"war_calls": [second], "faction_messages": [], "wars": []},
            "keys": {"war_calls": "id", "faction_messages": "id", "wars": "id"},
        }
        since_state = {"faction_id": FACTION, "since": state["timestamp"]}
        assert (await http.get("/events", params=since_state)).json()["events"] == []
        fake_upstream.update("war_calls", 2, {"target_id": 9})
        with trio.fail_after(10):
            await eventually_holds(lambda: war_calls_are(relay, [{**second, "target_id": 9}]))
        body = (await http.get("/events", params=since_state)).json()
        assert [event["data"]["eventType"] for event in body["events"]] == ["UPDATE"]
        assert body["events"][0]["data"]["old"] == second
        refused = await http.get("/state", params={"faction_id": 999})
        assert (refused.status_code, refused.json()["code"]) == (404, "not_subscribed")
        refused = await http.get("/state", params={"faction_id": "x"})
        assert (refused.status_code, refused.json()["code"]) == (400, "invalid_faction_id")


async def test_a_since_older_than_what_is_retained_is_answered_truncated(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    relay = await start(nursery, make_config, "[retention]\nevents_per_faction = 2\n")
    first, second, third = await relay.store.append_events(
        FACTION, [("hospital_update", {"n": n}) for n in range(3)]
    )
    async with httpx.AsyncClient(base_url=relay.url) as http:
        gap = (await http.get("/events", params={"faction_id": FACTION, "since": first.timestamp - 1})).json()
        assert gap["truncated"] is True
        assert [event["id"] for event in gap["events"]] == [second.id, third.id]
        whole = (await http.get("/events", params={"faction_id": FACTION, "since": first.timestamp})).json()
        assert "truncated" not in whole
        assert [event["id"] for event in whole["events"]] == [second.id, third.id]
    with trio.fail_after(10):
        async with open_sse(
            relay.url, f"/events/stream?faction_id={FACTION}&since={first.timestamp - 1}"
        ) as stream:
            signal = await stream.next_record()
            following = await stream.next_record()
    assert signal["event"] == "truncated"
    assert "id" not in signal  # the resume point stays the client's own
    assert json.loads(signal["data"]) == {"faction_id": FACTION, "since": first.timestamp - 1}
    assert following["id"] == str(second.timestamp)


async def test_a_large_state_is_the_same_json_sent_in_slices(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    """Over 256 KiB, `/state` is encoded off the loop and handed over a slice at a time: the bytes,
    the Content-Length and the framing are those of the answer built whole."""
    rows = [{"id": n, "faction_id": FACTION, "caller_name": f"Zoë {n} " + "x" * 1_000} for n in range(1, 401)]
    for row in rows:
        fake_upstream.insert("war_calls", row)
    relay = await start(nursery, make_config)
    in_key_order = sorted(rows, key=lambda row: json.dumps(row["id"]))  # the keys' JSON text order
    with trio.fail_after(20):
        await eventually_holds(lambda: war_calls_are(relay, in_key_order))
    async with httpx.AsyncClient(base_url=relay.url) as http:
        response = await http.get("/state", params={"faction_id": FACTION})
    state = await relay.store.faction_state(FACTION)
    expected = {
        "faction_id": FACTION,
        "timestamp": state.timestamp,
        "tables": state.tables,
        "keys": {"war_calls": "id", "faction_messages": "id", "wars": "id"},
    }
    body = json.dumps(expected, separators=(",", ":")).encode()
    assert len(body) > 256 * 1024
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in response.headers
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["access-control-allow-origin"] == "*"
