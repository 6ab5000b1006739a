"""The hot read paths (relay.http.hotpath) answer byte for byte as hypercorn's path does, over the
contract, and survive clients that misbehave on them.

One relay on real loopback sockets; each request is sent twice on fresh connections, once with the
hot path on and once off (`RunningRelay.hot_path.enabled`), and the raw bytes compared, the `date`
header's value aside. The hot path's own count shows which requests it took: a comparison the hot
path never took part in proves nothing.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

import httpx
import pytest
import trio

from relay.config import Config
from relay.http import hotpath
from relay.http.hotpath import HotPath
from relay.http.server import MAX_HEAD_BYTES
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.upstream_relay import call, settled
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e

TIMEOUT_S = 20
DATE = re.compile(rb"date: [^\r]*\r\n")


async def start(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake: FakeSupabase
) -> RunningRelay:
    # No per-address rate limit: the comparison sends every request twice from one address.
    relay: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nclient_rate = 0\n"))
    )
    async with httpx.AsyncClient(base_url=relay.url) as http:
        assert (
            await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
        ).status_code == 200
    await settled(relay)
    for n in (1, 2, 3):
        fake.insert("war_calls", call(n))
    await eventually(lambda: relay.store.kept_count(FACTION) == 3)
    return relay


def held_long_polls(relay: RunningRelay) -> int:
    return relay.services.held.statistics().held_long_polls


def hot_path(relay: RunningRelay) -> HotPath:
    assert relay.hot_path is not None
    return relay.hot_path


async def exchange(relay: RunningRelay, raw: bytes, answers: int = 1) -> bytes:
    """Send `raw` on a new connection; read `answers` whole answers (or to the end of stream)."""
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(raw)
        received = b""
        with trio.move_on_after(5):
            while _whole_answers(received) < answers:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    return DATE.sub(b"date: -\r\n", received)


def _whole_answers(data: bytes) -> int:
    count = 0
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return count
        length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
        size = int(length.group(1)) if length else 0
        if len(rest) < size:
            return count
        count += 1
        data = rest[size:]


def get(target: str, *headers: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: relay.example", *headers, "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_both_paths_answer_byte_for_byte_alike(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    fake_upstream: FakeSupabase,
    monkeypatch: pytest.MonkeyPatch,
    parser: str,
) -> None:
    """h11 parses the hot heads where httptools cannot be loaded (the pyz on another Python)."""
    if parser == "h11":
        monkeypatch.setattr(hotpath, "httptools", None)
    relay = await start(nursery, make_config, fake_upstream)
    events = (await relay.store.read_since(FACTION, None))[0]
    middle, newest = events[0].timestamp, events[-1].timestamp
    hot = [
        get("/ping"),
        get(f"/events?faction_id={FACTION}"),
        get(f"/events?faction_id={FACTION}&since={middle}"),
        get(f"/events?faction_id={FACTION}&since={newest}", "Origin: https://www.torn.com", "Accept: */*"),
        get(f"/events?since={newest}&faction_id={FACTION}&cache=1733000000"),
        get("/events?faction_id=abc"),
        get("/events"),
        get("/events?faction_id=999999"),
        get(f"/events?faction_id={FACTION}&since=x"),
        get(f"/events?faction_id={FACTION}&since=99999999999999"),
        get("/ping?x=%20y", "X-Forwarded-For: 10.0.0.1", "User-Agent: Mozilla/5.0 (TornPDA)"),
        get(f"/events?faction_id={FACTION}", "Cookie: a=b;  c=d", "Accept-Language:   en  "),
        get(f"/events?faction_id={FACTION}&wait=0"),
        get(f"/events?faction_id={FACTION}&since={middle}&wait=25"),  # events already there: at once
    ]
    cold = [
        get(f"/events?faction_id={FACTION}", version="1.0"),
        get(f"/events?faction_id={FACTION}", "Connection: close"),
        get(f"/events?faction_id={FACTION}", "Connection: keep-alive"),
        get(f"/events?faction_id={FACTION}", method="HEAD"),
        get("/events", method="OPTIONS"),
        get(f"/state?faction_id={FACTION}"),
        get("/health"),
        get("/pingx"),
        get(f"/events?faction_id={FACTION}", "Content-Length: 0"),
        get(f"/events?faction_id={FACTION}", "Expect: 100-continue"),
        get(f"/events?faction_id={FACTION}", "Upgrade: h2c"),
        get(
            "/ping",
            "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
        ),
        get(f"/events?faction_id={FACTION}", "Host: second.example"),  # two Hosts: h11's 400
        get(f"/events?faction_id={FACTION}", "Bad Header: x"),  # not a token: h11's 400
        b"GET /events?faction_id=1 HTTP/1.1\r\n\r\n",  # no Host: h11's 400
        get(f"/events?faction_id={FACTION}", "X-Pad: " + "a" * MAX_HEAD_BYTES),  # h11's 431
        b"GET /ev ents HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    hot_path(relay).enabled = True
    for raw in [*hot, *cold]:
        before = hot_path(relay).answered
        hot_path(relay).enabled = True
        fast = await exchange(relay, raw)
        taken = hot_path(relay).answered - before
        hot_path(relay).enabled = False
        slow = await exchange(relay, raw)
        assert fast == slow, raw
        assert fast.startswith(b"HTTP/1."), raw
        assert taken == (1 if raw in hot else 0), raw


async def test_pipelined_requests_are_answered_in_order_whichever_path_each_takes(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    relay = await start(nursery, make_config, fake_upstream)
    raw = b"".join(
        [
            get("/ping"),
            get(f"/events?faction_id={FACTION}"),
            get(f"/state?faction_id={FACTION}"),  # the ASGI path, then hot again once it is done
            get(f"/events?faction_id={FACTION}&since=1"),
            get("/ping"),
        ]
    )
    hot_path(relay).enabled = True
    fast = await exchange(relay, raw, answers=5)
    hot_path(relay).enabled = False
    slow = await exchange(relay, raw, answers=5)
    assert _whole_answers(fast) == 5
    assert fast == slow


async def test_hostile_clients_on_the_hot_path_cost_only_their_own_connection(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    fake_upstream: FakeSupabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = await start(nursery, make_config, fake_upstream)
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    poll = get(f"/events?faction_id={FACTION}")
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(TIMEOUT_S):
        # Vanishes the moment its request is out, with a reset.
        for _ in range(20):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(poll)
            stream.socket.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            await stream.aclose()
        # Pipelines thousands of polls and never reads an answer: its writes stall, and only it is cut.
        flooder = await trio.open_tcp_stream(host, int(port))
        flooder.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        with trio.move_on_after(2):
            for _ in range(2000):
                await flooder.send_all(poll * 10)
        # A hot request followed by garbage on the same connection: answered, then h11's 400.
        mixed = await exchange(relay, poll + b"\x00\x01garbage\r\n\r\n", answers=2)
        assert mixed.startswith(b"HTTP/1.1 200 ")
        assert b"HTTP/1.1 400 " in mixed
        # Others are served throughout.
        async with httpx.AsyncClient(base_url=relay.url) as http:
            assert (await http.get("/ping")).status_code == 200
            assert (await http.get("/events", params={"faction_id": FACTION})).json()["events"]
        await flooder.aclose()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert relay.services.http.connections.failed == 0


async def test_a_held_long_poll_on_the_hot_path_sees_its_client_hang_up_and_keeps_what_follows(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    """Held in the reader's task, the connection is read for a hang-up meanwhile: a client gone is
    counted as such and never answered; a request pipelined behind the held one is answered after it."""
    relay = await start(nursery, make_config, fake_upstream)
    newest = (await relay.store.read_since(FACTION, None))[0][-1].timestamp
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    held = get(f"/events?faction_id={FACTION}&since={newest}&wait=20")
    answered = hot_path(relay).answered
    with trio.fail_after(TIMEOUT_S):
        # Hangs up while held: the relay lets go of it at once.
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(held)
        await eventually(lambda: held_long_polls(relay) == 1)
        await stream.aclose()
        await eventually(lambda: held_long_polls(relay) == 0)
        # A /ping pipelined behind a held poll: answered after the poll, which an event releases.
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(held + get("/ping"))
        await eventually(lambda: held_long_polls(relay) == 1)
        fake_upstream.insert("war_calls", call(9))
        received = b""
        while _whole_answers(received) < 2:
            received += await stream.receive_some(65536)
        await stream.aclose()
    assert hot_path(relay).answered - answered == 3  # the hung-up poll, the released one, the ping
    first = received.partition(b"\r\n\r\n")[0]
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b'"id":9' in received.split(b"HTTP/1.1 200 ")[1]
    assert b'"status":"ok"' in received.split(b"HTTP/1.1 200 ")[2]
