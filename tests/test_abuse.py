"""Abuse over real sockets: rate limits per address, sockets a client leaves open, oversized heads."""

from __future__ import annotations

import contextlib
import functools
import urllib.parse
from collections.abc import Callable

import httpx
import pytest
import trio

from relay.config import Config
from relay.http.server import MAX_HEAD_BYTES
from relay.service import RunningRelay, run_relay
from tests.helpers.factions import ANON_KEY, FACTION

pytestmark = pytest.mark.e2e


async def start_relay(nursery: trio.Nursery, config: Config) -> RunningRelay:
    running: RunningRelay = await nursery.start(functools.partial(run_relay, config))
    return running


async def raw_exchange(url: str, request: bytes) -> tuple[bytes, bool]:
    """Send `request`, read until the server closes (True) or 3 s pass with the socket open (False)."""
    parts = urllib.parse.urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    async with stream:
        # The server may close before taking all of it; what it answered is still there to read.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(request)
        received = b""
        with trio.move_on_after(3):
            while chunk := await stream.receive_some():
                received += chunk
            return received, True
        return received, False


async def test_an_address_over_its_rate_gets_429_with_retry_after(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    relay = await start_relay(nursery, make_config("[limits]\nclient_rate = 0.5\nclient_burst = 3\n"))
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
            statuses = [
                (await http.get("/events", params={"faction_id": FACTION})).status_code for _ in range(2)
            ]
            refused = await http.get("/events", params={"faction_id": FACTION})
            assert (await http.get("/ping")).status_code == 200  # only the costly routes are limited
            assert (await http.get("/health")).status_code == 200
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "2"
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    relay.stop()


@pytest.mark.parametrize("view", ["/status", "/metrics"])
async def test_status_and_metrics_are_limited_as_ten_requests_each_and_ping_and_health_never(
    nursery: trio.Nursery, make_config: Callable[..., Config], view: str
) -> None:
    """A client looping on a view of the whole relay gets a tenth of a poller's rate; monitors asking
    /ping and /health from the same address are still answered."""
    relay = await start_relay(nursery, make_config("[limits]\nclient_rate = 0.5\nclient_burst = 20\n"))
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            statuses = [(await http.get(view)).status_code for _ in range(2)]
            refused = await http.get(view)
            other_view = await http.get("/metrics" if view == "/status" else "/status")
            monitors = {(await http.get(path)).status_code for path in ("/ping", "/health") * 20}
            other_address = await http.get(view, headers={"X-Forwarded-For": "198.51.100.7"})
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "20"  # ten tokens at 0.5 a second
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    assert other_view.status_code == 429  # one bucket per address, whatever the route
    assert monitors == {200}
    assert other_address.status_code == 429  # X-Forwarded-For from an untrusted peer is no way out
    relay.stop()


async def test_client_rate_zero_turns_the_limit_off(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    relay = await start_relay(nursery, make_config("[limits]\nclient_rate = 0\nclient_burst = 1\n"))
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
            statuses = {
                (await http.get("/events", params={"faction_id": FACTION})).status_code for _ in range(50)
            }
    assert statuses == {200}
    relay.stop()


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_connection_close_is_answered_and_the_socket_closed(relay: RunningRelay, version: str) -> None:
    with trio.fail_after(10):
        answer, closed = await raw_exchange(
            relay.url, f"GET /ping {version}\r\nHost: r\r\nConnection: close\r\n\r\n".encode()
        )
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"deployed":true' in answer
    assert closed


async def test_a_keep_alive_exchange_still_reuses_the_socket(relay: RunningRelay) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            first = await http.get("/ping", extensions={"trace": None})
            second = await http.get("/ping")
    assert first.status_code == second.status_code == 200


async def test_a_connection_that_never_sends_a_request_is_closed(
    nursery: trio.Nursery, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relay.http.server.KEEP_ALIVE_S", 0.5)
    relay = await start_relay(nursery, make_config())
    with trio.fail_after(10):
        answer, closed = await raw_exchange(relay.url, b"")
    assert (answer, closed) == (b"", True)
    relay.stop()


async def test_an_oversized_request_head_is_refused_without_a_5xx(relay: RunningRelay) -> None:
    # Over MAX_HEAD_BYTES and more than one read: h11 only limits what it holds incomplete.
    huge = b"X-Padding: " + b"a" * 300_000 + b"\r\n"
    with trio.fail_after(10):
        answer, closed = await raw_exchange(relay.url, b"GET /ping HTTP/1.1\r\nHost: r\r\n" + huge + b"\r\n")
    assert closed
    assert not answer.startswith(b"HTTP/1.1 5")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4")


def padded_head(total_bytes: int) -> bytes:
    start = b"GET /ping HTTP/1.1\r\nHost: r\r\nX-Padding: "
    end = b"\r\n\r\n"
    return start + b"a" * (total_bytes - len(start) - len(end)) + end


def without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.lower().startswith(b"date:"))


async def test_a_head_over_16_kib_is_431_however_it_arrives(relay: RunningRelay) -> None:
    """h11 limits only the head it holds incomplete: up to about 64 KiB passed when read at once."""
    with trio.fail_after(20):
        at_limit, _ = await raw_exchange(
            relay.url,
            padded_head(MAX_HEAD_BYTES) + b"GET /ping HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n",
        )
        assert at_limit.startswith(b"HTTP/1.1 200")
        for size in (MAX_HEAD_BYTES + 1, 60_000):
            answer, closed = await raw_exchange(relay.url, padded_head(size))
            assert closed
            assert answer.startswith(b"HTTP/1.1 431 "), size
        # The same bytes h11's own limit answers a head that arrives in several reads.
        incomplete, _ = await raw_exchange(relay.url, padded_head(300_000))
    assert without_date(answer) == without_date(incomplete)


async def test_a_request_head_trickled_byte_by_byte_is_cut_off(
    nursery: trio.Nursery, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slowloris: hypercorn counts a connection idle until a whole head has arrived, so the
    keep-alive timer (KEEP_ALIVE_S) also bounds how long a head may take."""
    monkeypatch.setattr("relay.http.server.KEEP_ALIVE_S", 0.5)
    relay = await start_relay(nursery, make_config())
    parts = urllib.parse.urlsplit(relay.url)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        async with stream:
            await stream.send_all(b"GET /ping HTTP/1.1\r\nHost: r\r\n")
            sent = 0
            with contextlib.suppress(trio.BrokenResourceError):
                while sent < 100:  # 10 s of trickle at most; the server must cut it long before
                    await stream.send_all(b"X")
                    sent += 1
                    with trio.move_on_after(0.1):
                        if await stream.receive_some() == b"":
                            break
    assert sent < 30
    relay.stop()
