"""The relay's own connection layer (`relay.http.server`) around hypercorn's HTTP/1.1 protocol: the
internals it was written against, answers byte-identical to hypercorn's own trio worker, and each
failure path (a client vanishing, one that stops reading, one that fails the app, HTTP/2, shutdown,
the connection cap, running out of descriptors) over real loopback sockets."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext

from relay.config import Config
from relay.http import server as http_server
from relay.http.server import hypercorn_config
from relay.http.stats import ConnectionCounters
from relay.service import RunningRelay, run_relay
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.waits import eventually

BIG = b"x" * (64 * 1024 * 1024)  # past any loopback socket's buffers
GRACEFUL_S = 2.0
KEEP_ALIVE_S = 30.0


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app with one path per behaviour the connection layer must survive."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path == "/raise":
        raise RuntimeError("a fault in the app")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:  # until the connection is cut: a reader that never reads never lets this end
            await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
    body = BIG if path == "/big" else b"hello"
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Server:
    port: int
    counters: ConnectionCounters
    stop: trio.Event
    stopped: trio.Event


def bare_config(**overrides: Any) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = GRACEFUL_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.accesslog = None
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


@asynccontextmanager
async def bare_server(max_connections: int = 1000, **overrides: Any) -> AsyncIterator[Server]:
    counters = ConnectionCounters(max_connections)
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await http_server.serve(
                bare_app,
                bare_config(**overrides),
                counters,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(run)
        yield Server(int(url.rsplit(":", 1)[1]), counters, stop, stopped)
        stop.set()


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_to_end(stream: trio.SocketStream) -> bytes:
    received = b""
    try:
        while chunk := await stream.receive_some():
            received += chunk
    except trio.BrokenResourceError:
        pass
    return received


def request(path: str, *, close: bool = True, extra: bytes = b"") -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: r\r\n" + connection + extra + b"\r\n"


# What this layer relies on, as it was when it was written: hypercorn's protocol and stream classes
# (their constructor, `_check_protocol`, `_send_h11_event`, `_send_error_response`, `handle`, the
# `Closed`/`Updated` events they send), the lifespan and worker context it runs, and the task group
# shape it stands in for. A new hypercorn must be read against relay/http/server.py before these
# are updated.
PINNED_SOURCES = {
    H11Protocol: "b32a61e0a8ca2127",
    HTTPStream: "e0f656feb55ab89c",
    Lifespan: "7c58a46fd0717442",
    WorkerContext: "45885f0c0bd5bc9d",
    TaskGroup: "8467a3a16a7e8763",
}


@pytest.mark.unit
@pytest.mark.parametrize("cls", list(PINNED_SOURCES), ids=lambda cls: cls.__name__)
def test_the_hypercorn_internals_used_are_the_ones_it_was_written_against(cls: type) -> None:
    assert importlib.metadata.version("hypercorn") == http_server.HYPERCORN_VERSION
    digest = hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]
    assert digest == PINNED_SOURCES[cls], f"hypercorn's {cls.__name__} changed: re-read relay/http/server.py"
    assert hasattr(h11.Connection, "send_with_data_passthrough")


def without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.lower().startswith(b"date:"))


async def exchange(port: int, raw: bytes) -> bytes:
    stream = await connect(port)
    async with stream:
        await stream.send_all(raw)
        return without_date(await read_to_end(stream))


@pytest.mark.e2e
async def test_answers_are_byte_identical_to_hypercorns_own_trio_worker(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    relay: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nclient_rate = 0\n"))
    )
    # The same app and services behind hypercorn's worker, on a second port.
    reference_config = hypercorn_config(relay.services.config)
    reference_config.bind = ["127.0.0.1:0"]
    (reference_url,) = await nursery.start(
        functools.partial(
            hypercorn_serve, relay.app.asgi_app, reference_config, shutdown_trigger=trio.sleep_forever
        )
    )
    ours, theirs = int(relay.url.rsplit(":", 1)[1]), int(reference_url.rsplit(":", 1)[1])
    subscribe = f'{{"faction_id": {FACTION}, "api_key": "{ANON_KEY}"}}'.encode()
    exchanges = [
        request("/ping"),
        request("/client.js"),
        request("/openapi.json"),
        request("/nowhere"),
        request(f"/events?faction_id={FACTION}&since=0"),
        request("/events?faction_id=nope"),
        b"DELETE /ping HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
        b"OPTIONS /events HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
        b"HEAD /ping HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
        b"GET /ping HTTP/1.0\r\n\r\n",
        request("/ping", close=False) + request("/client.js"),  # pipelined
        b"POST /subscribe HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\n\r\n{nope",
        b"POST /subscribe HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(subscribe)}\r\n\r\n".encode()
        + subscribe,
        b"GET / HTTP/1.1\r\nHost: r\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ]
    for raw in exchanges:
        with trio.fail_after(5):
            assert await exchange(ours, raw) == await exchange(theirs, raw), raw


@pytest.mark.e2e
async def test_a_client_vanishing_while_an_early_answer_is_written_is_counted_not_raised(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(relay.url.rsplit(":", 1)[1])
    with trio.fail_after(20):
        for k in range(40):  # issue 13's reproducer: it ended the whole relay within 40 tries
            stream = await connect(port)
            await stream.send_all(
                b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100000\r\n\r\n{"faction'
            )
            await trio.sleep(k * 0.0005)
            await stream.aclose()
        assert (await exchange(port, request("/ping"))).startswith(b"HTTP/1.1 200")
    assert relay.services.http.connections.failed == 0
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.virtual_time
async def test_a_reader_that_stops_reading_delays_nobody_and_is_cut_after_the_stall_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bare_server() as server:
        stuck = await connect(server.port)
        stuck.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stuck.send_all(request("/big"))
        started = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()  # its answer is stuck in the socket buffers
        assert (await exchange(server.port, request("/small"))).endswith(b"hello")
        assert trio.current_time() == started  # another member is answered meanwhile, undelayed
        assert server.counters.stalled == 0
        await eventually(lambda: server.counters.stalled == 1)
        assert trio.current_time() - started == pytest.approx(http_server.WRITE_STALL_S, abs=0.1)
        assert server.counters.open_connections == 0
        assert (await exchange(server.port, request("/small"))).endswith(b"hello")
        await stuck.aclose()


@pytest.mark.e2e
async def test_a_failure_serving_one_connection_is_logged_once_and_contained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10):
        async with bare_server() as server:
            assert await exchange(server.port, request("/raise")) == b""  # closed, never answered
            assert (await exchange(server.port, request("/small"))).endswith(b"hello")
            assert server.counters.failed == 1
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1:" in warnings[0].getMessage()
    assert "a fault in the app" in caplog.text  # with its traceback


@pytest.mark.e2e
async def test_http2_is_off_an_h2c_upgrade_is_served_as_http11_and_a_preface_is_refused() -> None:
    with trio.fail_after(10):
        async with bare_server() as server:
            upgrade = await exchange(
                server.port,
                request("/small", extra=b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"),
            )
            assert upgrade.startswith(b"HTTP/1.1 200")
            assert upgrade.endswith(b"hello")
            preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" * 100
            assert (await exchange(server.port, preface)).startswith(b"HTTP/1.1 505")
            assert server.counters.http2_refused == 1


@pytest.mark.virtual_time
async def test_shutdown_cuts_a_reader_that_stopped_reading_at_the_graceful_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bare_server() as server:
        stuck = await connect(server.port)
        await stuck.send_all(request("/stream"))
        await eventually(lambda: server.counters.open_connections == 1)
        await trio.testing.wait_all_tasks_blocked()
        stopping_at = trio.current_time()
        server.stop.set()
        await server.stopped.wait()
        assert trio.current_time() - stopping_at == pytest.approx(GRACEFUL_S)
        await stuck.aclose()


@pytest.mark.virtual_time
async def test_idle_connections_close_at_once_on_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    async with bare_server() as server:
        idle = await connect(server.port)
        await idle.send_all(request("/small", close=False))
        answered = b""
        while not answered.endswith(b"hello"):
            answered += await idle.receive_some()
        stopping_at = trio.current_time()
        server.stop.set()
        await server.stopped.wait()
        assert trio.current_time() == stopping_at
        assert await idle.receive_some() == b""  # closed by the server
        await idle.aclose()


@pytest.mark.virtual_time
async def test_connections_over_the_cap_wait_until_one_closes(autojump_clock: trio.testing.MockClock) -> None:
    async with bare_server(max_connections=2) as server:
        holders = [await connect(server.port) for _ in range(2)]
        await eventually(lambda: server.counters.accepted == 2)
        waiting = await connect(server.port)  # taken by the kernel's backlog
        await waiting.send_all(request("/small"))
        await trio.testing.wait_all_tasks_blocked()
        assert server.counters.accepted == 2
        await holders[0].aclose()
        assert (without_date(await read_to_end(waiting))).endswith(b"hello")
        assert server.counters.accepted == 3
        await holders[1].aclose()
        await waiting.aclose()


def fill_descriptors_but_one() -> list[int]:
    """Open /dev/null until the limit, then free one: exactly one descriptor is left."""
    taken = []
    with pytest.raises(OSError, match="Too many open files"):  # noqa: PT012 (the loop ends only by raising)
        while True:
            taken.append(os.open(os.devnull, os.O_RDONLY))
    os.close(taken.pop())
    return taken


@pytest.mark.e2e
async def test_running_out_of_descriptors_is_logged_once_and_new_members_served_when_holders_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(10):
        async with bare_server() as server:
            holder, newcomer = trio.socket.socket(), trio.socket.socket()  # made while descriptors remain
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
            taken = fill_descriptors_but_one()
            try:
                await holder.connect(("127.0.0.1", server.port))
                await eventually(lambda: server.counters.accepted == 1)
                await newcomer.connect(("127.0.0.1", server.port))  # the kernel's backlog takes it
                await newcomer.send(request("/small"))
                await eventually(lambda: server.counters.accept_errors > 0)
                holder.close()  # a holder goes: its descriptor, freed, is the newcomer's
                answer = b""
                while chunk := await newcomer.recv(65536):
                    answer += chunk
                assert answer.endswith(b"hello")
            finally:
                for descriptor in taken:
                    os.close(descriptor)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                holder.close()
                newcomer.close()
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(messages) == 2, messages
    assert messages[0].startswith("cannot accept connections: EMFILE")
    assert messages[1].startswith("accepting connections again")
    assert all(record.exc_info is None for record in caplog.records)
