"""Today's userscript as httpx plays it against a relay, and waits on the relay's `/status`."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio

from tests.helpers.factions import ANON_KEY

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
    """The faction's socket connected, and the shared DELETE socket too when there is one: under the
    default replica identity it is the only way a DELETE reaches the relay."""
    while True:
        status = await read_status(http)
        factions = {f["faction_id"]: f for f in status["factions"]}
        shared = status.get("shared_deletes")
        if (
            faction_id in factions
            and factions[faction_id]["upstream"]["state"] == "connected"
            and (shared is None or shared["state"] == "connected")
        ):
            return
        await trio.sleep(POLL_S)


async def wait_reconciled(http: httpx.AsyncClient, faction_id: int) -> None:
    """Connected and its first reconcile done: a change made upstream before that reconcile reads
    the table may reach the relay as the reconcile's resync event rather than live."""
    await wait_connected(http, faction_id)
    while True:
        factions = {f["faction_id"]: f for f in (await read_status(http))["factions"]}
        if faction_id in factions and factions[faction_id]["reconcile"]["reconciles"] >= 1:
            return
        await trio.sleep(POLL_S)


async def connected_script(http: httpx.AsyncClient, faction_id: int) -> Userscript:
    """Today's script subscribed, once the faction's upstream socket is connected."""
    script = Userscript(http, faction_id)
    await script.start()
    await wait_connected(http, faction_id)
    return script
