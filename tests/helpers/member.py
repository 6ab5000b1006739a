"""A member that keeps a copy of its faction's rows the way relay/static/client.js does, over a raw
socket whose receive buffer is as small as a slow phone's, so that a test can stop it reading.

It follows the client's documented rules (docs/client.md): a cursor; every event at or below it
dropped; `truncated` (an SSE event, or `"truncated": true` on a poll) answered by reloading `/state`,
whose rows and cursor replace its own, and then carrying on from that cursor.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from typing import Any

import httpx
import trio

from tests.helpers.sse_client import SseStream

SLOW_RECEIVE_BUFFER = 4096


async def open_slow_stream(url: str) -> trio.SocketStream:
    """A loopback connection whose receive buffer is fixed at 4 KB (no autotuning), so that a reader
    that stops reading holds the server back after a few KB, as a phone on a slow link does."""
    parts = urllib.parse.urlsplit(url)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER)
    await sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    return trio.SocketStream(sock)


class MirroringMember:
    def __init__(self, url: str, faction_id: int, cursor: int) -> None:
        self.url = url
        self.faction_id = faction_id
        self.cursor = cursor
        self.rows: dict[tuple[str, Any], dict[str, Any]] = {}
        self.key_columns: dict[str, str] = {}
        self.truncations = 0
        self.events = 0
        self.streaming = trio.Event()  # the first stream's head has arrived

    def table(self, table: str) -> list[dict[str, Any]]:
        return sorted(
            (row for (name, _), row in self.rows.items() if name == table),
            key=lambda row: row[self.key_columns.get(table, "id")],
        )

    async def heal(self) -> None:
        """What client.js does when told of a gap: its rows and cursor become the relay's /state."""
        self.truncations += 1
        await self.load_state()

    async def load_state(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as http:
            state = (await http.get("/state", params={"faction_id": self.faction_id})).json()
        self.key_columns = state["keys"]
        self.rows = {
            (table, row[self.key_columns[table]]): row
            for table, rows in state["tables"].items()
            for row in rows
        }
        self.cursor = max(self.cursor, state["timestamp"])

    def deliver(self, event: dict[str, Any]) -> None:
        if event["timestamp"] <= self.cursor:
            return
        self.cursor = event["timestamp"]
        self.events += 1
        change = event["data"]
        table = change["table"]
        key_column = self.key_columns.get(table, "id")
        if change["eventType"] == "DELETE":
            self.rows.pop((table, change["old"][key_column]), None)
        else:
            self.rows[(table, change["new"][key_column])] = change["new"]

    async def stream(self, stop_reading: trio.Event, resume_reading: trio.Event) -> None:
        """Follow `/events/stream`; after the head, stop reading at `stop_reading` until
        `resume_reading`. Reopens from its cursor after healing, as client.js does."""
        while True:
            stream = await open_slow_stream(self.url)
            async with stream:
                host = urllib.parse.urlsplit(self.url).netloc
                path = f"/events/stream?faction_id={self.faction_id}&since={self.cursor}"
                await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                sse = SseStream(stream)
                await sse.read_head()
                assert sse.status == 200
                self.streaming.set()
                while True:
                    if stop_reading.is_set():
                        await resume_reading.wait()
                    record = await sse.next_record()
                    if record.get("event") == "truncated":
                        assert json.loads(record["data"]) == {
                            "faction_id": self.faction_id,
                            "since": self.cursor,
                        }
                        await self.heal()
                        break  # reopened from the new cursor, as client.js does
                    if "data" in record:
                        self.deliver(json.loads(record["data"]))

    async def long_poll(self, stop_reading: trio.Event, resume_reading: trio.Event) -> None:
        """Long-poll (`wait=25`, one connection per poll); a poll sent at or after `stop_reading` is
        not read until `resume_reading`."""
        host = urllib.parse.urlsplit(self.url).netloc
        while True:
            stream = await open_slow_stream(self.url)
            async with stream:
                path = f"/events?faction_id={self.faction_id}&since={self.cursor}&wait=25"
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                self.streaming.set()
                if stop_reading.is_set():
                    await resume_reading.wait()
                body = json.loads(await read_whole_answer(stream))
            if body.get("truncated"):
                await self.heal()  # which also covers this answer's events
                continue
            for event in body["events"]:
                self.deliver(event)
            self.cursor = max(self.cursor, body["timestamp"])


async def read_whole_answer(stream: trio.SocketStream) -> bytes:
    """The body of one HTTP/1.1 answer with a Content-Length."""
    answer = SseStream(stream)
    await answer.read_head()
    assert answer.status == 200, answer.status
    return await answer.read_sized_body()
