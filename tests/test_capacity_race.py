"""`limits.max_factions` under concurrent subscribes and revives (issue 20, point 2).

Each active faction holds an upstream socket, and `max_factions` is what keeps the Supabase project
under its connection quota; the key a subscribe needs is public in every userscript. Capacity is
taken before the subscription's write is awaited, so requests arriving meanwhile cannot all pass the
same check. Real sockets, many source addresses (each has its own rate limit), a small cap; counted
in upstream sockets at the fake.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.supervisor import UpstreamState
from tests.helpers.factions import ANON_KEY
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e

CAP = 5
ADDRESSES = 50
PER_ADDRESS = 6  # 300 requests at once


@asynccontextmanager
async def members(url: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One client per loopback source address, as members behind their own addresses."""
    async with AsyncExitStack() as stack:
        clients = []
        for n in range(ADDRESSES):
            transport = httpx.AsyncHTTPTransport(local_address=f"127.0.{1 + n // 200}.{1 + n % 200}")
            clients.append(
                await stack.enter_async_context(httpx.AsyncClient(base_url=url, transport=transport))
            )
        yield clients


Request = Callable[[], Awaitable[httpx.Response]]


async def all_at_once(requests: list[Request]) -> Counter[tuple[int, str]]:
    """Fire every request together; count the answers by status and code."""
    answers: Counter[tuple[int, str]] = Counter()

    async def one(request: Request) -> None:
        response = await request()
        body = response.json()
        answers[(response.status_code, body.get("code") or body.get("status", ""))] += 1

    async with trio.open_nursery() as nursery:
        for request in requests:
            nursery.start_soon(one, request)
    return answers


def running_supervisors(relay: RunningRelay) -> int:
    """Upstream supervisors not stopped (an expired faction's stays listed, stopped)."""
    return sum(1 for stats in relay.supervisors.statistics().values() if stats.state != UpstreamState.STOPPED)


def faction_sockets(fake: FakeSupabase, factions: range) -> int:
    return sum(1 for faction_id in factions if fake.connections_with(f"faction_id=eq.{faction_id}"))


async def test_hundreds_of_concurrent_subscribes_from_many_addresses_open_at_most_max_factions(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    relay: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config(f"[limits]\nmax_factions = {CAP}\n"))
    )
    factions = range(1000, 1000 + ADDRESSES * PER_ADDRESS)
    with trio.fail_after(60):
        async with members(relay.url) as clients:
            requests: list[Request] = [
                functools.partial(
                    clients[i % ADDRESSES].post,
                    "/subscribe",
                    json={"faction_id": faction_id, "api_key": ANON_KEY},
                )
                for i, faction_id in enumerate(factions)
            ]
            answers = await all_at_once(requests)
        assert answers == Counter({(200, "subscribed"): CAP, (429, "too_many_factions"): len(factions) - CAP})
        assert len(relay.store.active_factions()) == CAP
        assert running_supervisors(relay) == CAP
        await eventually(lambda: faction_sockets(fake_upstream, factions) == CAP)
    relay.stop()


async def test_hundreds_of_concurrent_polls_of_expired_factions_revive_at_most_max_factions(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    relay: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config(f"[limits]\nmax_factions = {CAP}\n"))
    )
    expired = range(2000, 2000 + 4 * CAP)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            for first in range(expired.start, expired.stop, CAP):  # CAP at a time, then expired
                for faction_id in range(first, first + CAP):
                    subscribed = await http.post(
                        "/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY}
                    )
                    assert subscribed.status_code == 200
                await relay.services.factions.expire_idle(0.0)
                assert relay.store.active_factions() == []
        async with members(relay.url) as clients:
            requests: list[Request] = [
                functools.partial(
                    clients[i % ADDRESSES].get,
                    "/events",
                    params={"faction_id": expired[i % len(expired)], "since": 0},
                )
                for i in range(ADDRESSES * PER_ADDRESS)
            ]
            answers = await all_at_once(requests)
        revived = relay.store.active_factions()
        assert len(revived) == CAP
        # Every poll of a revived faction is answered; every other one refused for capacity.
        refused = answers[(429, "too_many_factions")]
        assert refused + sum(n for (status, _), n in answers.items() if status == 200) == len(requests)
        assert refused == sum(1 for i in range(len(requests)) if expired[i % len(expired)] not in revived)
        assert running_supervisors(relay) == CAP
        await eventually(lambda: faction_sockets(fake_upstream, expired) == CAP)
    relay.stop()
