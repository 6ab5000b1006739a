"""Today's userscript, played by httpx, against hypercorn on a real port and the fake upstream."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio

from relay.service import RunningRelay
from relay.testing.fake_supabase import FakeSupabase
from tests.conftest import ANON_KEY, FACTION, OTHER_FACTION, eventually

POLL_S = 0.05  # the script polls every 3 s; the test only needs the same behaviour faster


class Userscript:
    """What the CAT userscript does with the relay, as the contract's "Today's userscript" describes."""

    def __init__(self, http: httpx.AsyncClient, faction_id: int) -> None:
        self.http = http
        self.faction_id = faction_id
        self.cursor = int(time.time() * 1000)  # the browser's own Date.now() when the client is made
        self.messages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # as received, for checks that they are served unchanged

    async def start(self) -> None:
        ping = await self.http.get("/ping", timeout=5)
        assert ping.status_code == 200
        assert ping.json().get("deployed") or ping.json().get("status")
        subscribed = await self.http.post(
            "/subscribe", json={"faction_id": self.faction_id, "api_key": ANON_KEY}
        )
        assert subscribed.status_code == 200
        assert subscribed.json()["status"] == "subscribed"

    async def poll(self) -> None:
        response = await self.http.get(
            "/events", params={"faction_id": self.faction_id, "since": self.cursor}
        )
        body = response.json()
        self.events.extend(body["events"])
        for event in body["events"]:
            # Anything but the two client types is dispatched as a WebSocket-style message.
            self.messages.append(
                json.loads(json.dumps({"event": "postgres_changes", "payload": event["data"]}))
            )
        if body["events"]:
            self.cursor = body["timestamp"]

    async def poll_until(self, count: int) -> None:
        while len(self.messages) < count:
            await self.poll()
            await trio.sleep(POLL_S)


async def read_status(http: httpx.AsyncClient) -> dict[str, Any]:
    """GET /status, waiting out its rate limit (it counts as ten requests) as a polite poller does."""
    while True:
        answer = await http.get("/status")
        if answer.status_code != 429:
            document: dict[str, Any] = answer.json()
            return document
        await trio.sleep(float(answer.headers["Retry-After"]))


async def wait_connected(http: httpx.AsyncClient, faction_id: int) -> None:
    while True:
        factions = {f["faction_id"]: f for f in (await read_status(http))["factions"]}
        if faction_id in factions and factions[faction_id]["upstream"]["state"] == "connected":
            return
        await trio.sleep(POLL_S)


async def wait_reconciled(http: httpx.AsyncClient, faction_id: int) -> None:
    """Connected and its first reconcile done: a change made upstream before that reconcile reads
    the table may reach the relay as the reconcile's resync event rather than live."""
    while True:
        factions = {f["faction_id"]: f for f in (await read_status(http))["factions"]}
        if faction_id in factions and factions[faction_id]["reconcile"]["reconciles"] >= 1:
            return
        await trio.sleep(POLL_S)


def call(faction_id: int, call_id: int) -> dict[str, Any]:
    return {
        "id": call_id,
        "faction_id": faction_id,
        "war_id": 77,
        "target_id": 2_000_000 + call_id,
        "caller_id": 1_000 + call_id,
        "caller_name": "alice",
        "created_at": "2026-11-24T15:00:00.118+00:00",
    }


async def test_todays_userscript_sees_insert_update_delete_in_order(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 1))
            fake_upstream.update("war_calls", 1, {"caller_id": 1_002, "caller_name": "bob"})
            fake_upstream.delete("war_calls", 1)
            await script.poll_until(3)
    payloads = [message["payload"] for message in script.messages]
    assert [message["event"] for message in script.messages] == ["postgres_changes"] * 3
    assert [p["eventType"] for p in payloads] == ["INSERT", "UPDATE", "DELETE"]
    assert all(p["table"] == "war_calls" and p["schema"] == "public" for p in payloads)
    inserted, updated, deleted = payloads
    assert inserted["new"] == call(FACTION, 1)
    assert inserted["old"] == {}
    assert (updated["new"]["caller_name"], updated["new"]["target_id"]) == ("bob", 2_000_001)
    assert deleted["new"] == {}
    assert deleted["old"]["target_id"] == 2_000_001  # how today's script recognises an uncall
    assert all(isinstance(p["commit_timestamp"], str) and p["errors"] is None for p in payloads)


async def test_one_faction_faulted_upstream_while_another_keeps_flowing(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            healthy, faulted = Userscript(http, FACTION), Userscript(http, OTHER_FACTION)
            await healthy.start()
            await faulted.start()
            await wait_connected(http, FACTION)
            await wait_connected(http, OTHER_FACTION)
            fake_upstream.fail_joins("RealtimeRestarting: Realtime is restarting, please standby")
            fake_upstream.shutdown_channel(
                f"realtime:public:war_calls:faction_id=eq.{OTHER_FACTION}", "Node request timeout"
            )
            for n in range(1, 4):
                fake_upstream.insert("war_calls", call(FACTION, n))
            await healthy.poll_until(3)
            status = {f["faction_id"]: f for f in (await http.get("/status")).json()["factions"]}
            assert status[FACTION]["upstream"]["state"] == "connected"
            assert status[OTHER_FACTION]["upstream"]["state"] in {"backoff", "connecting"}
            # The channel shutdown, or the refused rejoin after it, whichever came last.
            last_error = status[OTHER_FACTION]["upstream"]["last_error"]
            assert "Node request timeout" in last_error or "RealtimeRestarting" in last_error
            fake_upstream.accept_joins()
            await wait_connected(http, OTHER_FACTION)
            fake_upstream.insert("war_calls", call(OTHER_FACTION, 10))
            await faulted.poll_until(1)
    assert [m["payload"]["new"]["id"] for m in healthy.messages] == [1, 2, 3]
    assert [m["payload"]["new"]["id"] for m in faulted.messages] == [10]


async def test_shutdown_answers_a_long_poll_in_flight_and_closes_upstream(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    answers: list[httpx.Response] = []

    async def long_poll(http: httpx.AsyncClient) -> None:
        answers.append(await http.get("/events", params={"faction_id": FACTION, "wait": 30}))

    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url, timeout=60) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll, http)
                await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
                relay.stop()
            await fake_upstream.wait_until(lambda: not fake_upstream.connections)
    (answer,) = answers
    assert (answer.status_code, answer.json()["events"]) == (200, [])
