"""Lean load-generating clients: hand-rolled HTTP/1.1 over `trio.open_tcp_stream`, one task per client.

httpx would spend more CPU per request than the relay does, and the load generator shares the
machine with the relay, so these parse just enough HTTP (status line, Content-Length, chunked
bodies) to play three kinds of client: today's userscript (plain poll every 3 s), a long-poller
(`wait=`, re-requesting at once with the answer's cursor) and an SSE reader (`/events/stream`).
Each records, per event, `received_ns - emitted_ns` (the upstream row's emit time, same clock).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

RECEIVE_BYTES = 65536
MAX_HEAD_BYTES = 16384
# A client gives up after this many failed connections or requests, so a broken relay cannot keep
# thousands of tasks retrying for the rest of the run; each failure is counted in the tally.
MAX_ERRORS_PER_CLIENT = 20
RETRY_DELAY_S = 1.0
HEAD_TIMEOUT_S = 30.0  # an SSE head, or a plain poll's answer
ANSWER_SLACK_S = 15.0  # beyond `wait`, before a held poll counts as lost
SSE_SILENCE_S = 40.0  # the relay sends a keep-alive comment every 15 s
POLL_INTERVAL_S = 3.0  # today's userscript


class ClientError(Exception):
    """A failed exchange; `kind` is the tally key (`status_503`, `closed`, `bad_head`, ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class Tally:
    """Shared by every client of one scenario (one trio thread, so plain counters are safe)."""

    window_from_ns: int = 0
    window_to_ns: int = 0  # empty window until the measurement starts
    latencies_ns: list[int] = field(default_factory=list)
    emitted_ns: list[int] = field(default_factory=list)  # beside latencies_ns, for the time profile
    # The relay stamps an event (`timestamp`, ms) in its writer thread as it inserts it: emit to stamp
    # is the upstream socket and the queue for the writer, stamp to arrival the commit and delivery.
    to_stamp_ns: list[int] = field(default_factory=list)
    delivered: Counter[int] = field(default_factory=Counter)  # in-window events, per faction
    received: int = 0
    duplicates: int = 0
    unstamped: int = 0  # events that are not an upstream row the benchmark emitted
    ready: int = 0
    gave_up: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def restart_window(self, from_ns: int, to_ns: int) -> None:
        self.window_from_ns, self.window_to_ns = from_ns, to_ns
        self.latencies_ns.clear()
        self.emitted_ns.clear()
        self.to_stamp_ns.clear()
        self.delivered.clear()

    def record(self, client: ClientState, event: dict[str, Any], received_ns: int) -> None:
        self.received += 1
        if event["id"] <= client.last_event_id:
            self.duplicates += 1  # the relay promises each event once, in order
            return
        client.last_event_id = event["id"]
        emitted_ns = (event["data"].get("new") or {}).get("emitted_ns")
        if emitted_ns is None:
            self.unstamped += 1  # not one of the upstream's rows (a reconcile's resync, say): not timed
            return
        if self.window_from_ns <= emitted_ns < self.window_to_ns:
            self.latencies_ns.append(received_ns - emitted_ns)
            self.emitted_ns.append(emitted_ns)
            self.to_stamp_ns.append(event["timestamp"] * 1_000_000 - emitted_ns)
            self.delivered[client.faction_id] += 1


@dataclass
class ClientState:
    faction_id: int
    source: str
    last_event_id: int = 0
    last_sse_id: str | None = None  # sent as Last-Event-ID when a stream is reopened


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    connect_limiter: trio.CapacityLimiter  # hypercorn listens with a backlog of 100


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[bytes, bytes]

    @property
    def chunked(self) -> bool:
        return b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()

    @property
    def closes(self) -> bool:
        return self.headers.get(b"connection", b"").lower() == b"close"


class Connection:
    """Buffered reading of HTTP/1.1 answers; `received_ns` is the clock right after the last receive."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.received_ns = 0

    async def _fill(self) -> None:
        data = await self.stream.receive_some(RECEIVE_BYTES)
        self.received_ns = time.time_ns()
        if not data:
            raise ClientError("closed")
        self.buffer += data

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise ClientError("bad_head")
            await self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_head(self) -> Head:
        parts = (await self._line()).split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ClientError("bad_head")
        headers: dict[bytes, bytes] = {}
        for _ in range(100):
            line = await self._line()
            if not line:
                return Head(int(parts[1]), headers)
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        raise ClientError("bad_head")

    async def read_chunk(self) -> bytes:
        """The next chunk of a chunked body; b"" at its end."""
        size_line = await self._line()
        size = int(size_line.split(b";")[0], 16)
        data = await self._exactly(size + 2)
        if size == 0:
            return b""
        return data[:-2]

    async def read_body(self, head: Head) -> bytes:
        if head.chunked:
            chunks: list[bytes] = []
            for _ in range(10_000):
                chunk = await self.read_chunk()
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
            raise ClientError("bad_body")
        return await self._exactly(int(head.headers.get(b"content-length", b"0")))


def source_address(client_number: int) -> str:
    """A loopback address of the client's own (127.1.x.y): the relay limits requests per address,
    and members are distinct addresses, not one."""
    return f"127.1.{client_number // 250 % 256}.{client_number % 250 + 1}"


async def connect(target: Target, source: str) -> trio.SocketStream:
    async with target.connect_limiter:
        return await trio.open_tcp_stream(target.host, target.port, local_address=source)


def request(target: Target, path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {target.host}:{target.port}", *extra, "", ""]
    return "\r\n".join(lines).encode()


def error_kind(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return exc.kind
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, ValueError | KeyError | TypeError):
        return "bad_answer"
    return type(exc).__name__


CLIENT_ERRORS = (
    ClientError,
    OSError,
    trio.BrokenResourceError,
    trio.TooSlowError,
    ValueError,
    KeyError,
    TypeError,
)


async def poll_client(
    target: Target, tally: Tally, number: int, faction_id: int, since: int, wait_s: float
) -> None:
    """A plain poller (`wait_s` 0, every 3 s, cursor kept until an answer has events) or a long-poller."""
    client = ClientState(faction_id, source_address(number))
    first = True
    if wait_s == 0:
        await trio.sleep(random.random() * POLL_INTERVAL_S)  # spread the pollers' phases
    for _ in range(MAX_ERRORS_PER_CLIENT):
        try:
            async with await connect(target, client.source) as stream:
                connection = Connection(stream)
                while True:
                    path = f"/events?faction_id={faction_id}&since={since}"
                    await stream.send_all(request(target, path + (f"&wait={wait_s:g}" if wait_s else "")))
                    tally.ready += first
                    first = False
                    with trio.fail_after(wait_s + ANSWER_SLACK_S if wait_s else HEAD_TIMEOUT_S):
                        head = await connection.read_head()
                        body = await connection.read_body(head)
                    if head.status != 200:
                        raise ClientError(f"status_{head.status}")
                    answer = json.loads(body)
                    for event in answer["events"]:
                        tally.record(client, event, connection.received_ns)
                    if wait_s or answer["events"]:
                        since = answer["timestamp"]
                    if head.closes:
                        break
                    if not wait_s:
                        await trio.sleep(POLL_INTERVAL_S)
        except CLIENT_ERRORS as exc:
            tally.errors[error_kind(exc)] += 1
            await trio.sleep(RETRY_DELAY_S)
    tally.gave_up += 1


async def sse_client(target: Target, tally: Tally, number: int, faction_id: int) -> None:
    """Reads `/events/stream`, resuming with `Last-Event-ID` after a lost stream."""
    client = ClientState(faction_id, source_address(number))
    first = True
    for _ in range(MAX_ERRORS_PER_CLIENT):
        try:
            async with await connect(target, client.source) as stream:
                connection = Connection(stream)
                resume = [f"Last-Event-ID: {client.last_sse_id}"] if client.last_sse_id else []
                path = f"/events/stream?faction_id={faction_id}"
                await stream.send_all(request(target, path, "Accept: text/event-stream", *resume))
                with trio.fail_after(HEAD_TIMEOUT_S):
                    head = await connection.read_head()
                if head.status != 200:
                    raise ClientError(f"status_{head.status}")
                if not head.chunked:
                    raise ClientError("not_chunked")
                tally.ready += first
                first = False
                await read_stream(connection, tally, client)
                raise ClientError("stream_ended")
        except CLIENT_ERRORS as exc:
            tally.errors[error_kind(exc)] += 1
            await trio.sleep(RETRY_DELAY_S)
    tally.gave_up += 1


async def read_stream(connection: Connection, tally: Tally, client: ClientState) -> None:
    """Read SSE messages until the stream ends."""
    pending = b""
    while True:
        with trio.fail_after(SSE_SILENCE_S):
            chunk = await connection.read_chunk()
        if not chunk:
            return
        pending += chunk
        *messages, pending = pending.split(b"\n\n")
        for message in messages:
            for line in message.split(b"\n"):
                if line.startswith(b"id:"):
                    client.last_sse_id = line[3:].strip().decode()
                elif line.startswith(b"data:"):
                    tally.record(client, json.loads(line[5:]), connection.received_ns)
