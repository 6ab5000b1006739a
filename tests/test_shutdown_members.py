"""Shutdown with members connected: a `relay serve` holding a thousand long-polls and SSE streams,
half of whose clients stopped reading in the middle of large answers, exits 0 within 5 s of SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, call
from tests.helpers.relay_process import relay_process
from tests.helpers.userscript import Userscript, wait_connected
from tests.helpers.waits import eventually_async

pytestmark = pytest.mark.e2e

MEMBERS = 1000
SHUTDOWN_BOUND_S = 5.0
BIG_CALLS = 20
NOTE_BYTES = 50_000  # 20 calls of 50 KB: a megabyte per stream, far past a stuck socket's buffers


def held_requests(metrics: str) -> int:
    return sum(
        int(float(n)) for n in re.findall(r"^cat_relay_held_requests\{kind=\"\w+\"\} (\S+)$", metrics, re.M)
    )


async def read_forever(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


def big_call(call_id: int) -> dict[str, Any]:
    row = call(FACTION, call_id)
    row["caller_name"] = "x" * NOTE_BYTES
    return row


async def test_sigterm_exits_0_within_5_s_with_a_thousand_held_members_half_not_reading(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    config.write_text(config.read_text() + "[limits]\nclient_rate = 0\n")
    with trio.fail_after(90):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            await Userscript(http, FACTION).start()
            await wait_connected(http, FACTION)
            cursor = (await http.get("/events", params={"faction_id": FACTION})).json()["timestamp"]
            port = int(relay.url.rsplit(":", 1)[1])
            members: list[trio.SocketStream] = []
            async with trio.open_nursery() as readers:
                for n in range(MEMBERS):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    members.append(stream)
                    path = "/events/stream" if n % 2 else "/events"
                    query = f"faction_id={FACTION}&since={cursor}" + ("" if n % 2 else "&wait=30")
                    if n % 4 < 2:  # stopped reading: the smallest receive buffer, never read
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
                    else:
                        readers.start_soon(read_forever, stream)
                    await stream.send_all(f"GET {path}?{query} HTTP/1.1\r\nHost: r\r\n\r\n".encode())

                metrics = [""]

                async def scrape() -> None:
                    metrics[0] = (await http.get("/metrics")).text

                await eventually_async(scrape, lambda: held_requests(metrics[0]) == MEMBERS)
                for call_id in range(BIG_CALLS):  # answers and stream chunks the stuck ones never take
                    fake_upstream.insert("war_calls", big_call(call_id))

                found: list[Any] = []
                since = [cursor]

                async def poll() -> None:  # a page at a time: 1 MB is more than one answer carries
                    answer = (
                        await http.get("/events", params={"faction_id": FACTION, "since": since[0]})
                    ).json()
                    found.extend(answer["events"])
                    since[0] = answer["timestamp"]

                await eventually_async(poll, lambda: len(found) == BIG_CALLS)
                relay.process.send_signal(signal.SIGTERM)
                signalled_at = trio.current_time()
                status = await relay.process.wait()
                took = trio.current_time() - signalled_at
                readers.cancel_scope.cancel()
            for stream in members:
                stream.socket.close()
    assert status == 0
    assert took <= SHUTDOWN_BOUND_S, f"shutdown took {took:.1f} s"
    assert "Traceback" not in relay.text()
