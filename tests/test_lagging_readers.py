"""Members who fall behind the retained window while connected (issue 20, point 1).

A phone on a slow link during a war burst: its stream or its poll is held back by TCP (a 4 KB receive
buffer it stops reading) while more changes arrive than the relay keeps per faction. Whatever the
transport, it must be told of the gap after it was open, not only when it opens, and heal from
`/state` as relay/static/client.js does, ending with exactly the upstream rows. A member who keeps up
is served all along.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.traffic import Source
from tests.helpers.factions import FACTION, call
from tests.helpers.flood import stored
from tests.helpers.member import MirroringMember
from tests.helpers.userscript import Userscript, wait_reconciled
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e

WINDOW = 50  # events kept per faction
BURST = 1_000  # new calls, each ~2 KB: 2 MB, far more than the socket buffers between relay and member
BURST_PER_S = 250
PADDING = "x" * 2_000


def padded_call(n: int) -> dict[str, Any]:
    return {**call(FACTION, 1 + n), "caller_name": f"n{n} {PADDING}"}


@pytest.mark.parametrize("transport", ["stream", "long_poll"])
async def test_a_member_who_stops_reading_through_a_burst_is_told_and_heals_from_state(
    transport: str, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    async with trio.open_nursery() as nursery:
        relay: RunningRelay = await nursery.start(
            functools.partial(run_relay, make_config(f"[retention]\nevents_per_faction = {WINDOW}\n"))
        )
        with trio.fail_after(90):
            async with httpx.AsyncClient(base_url=relay.url) as http:
                await Userscript(http, FACTION).start()
                await wait_reconciled(http, FACTION)
            start = relay.store.cursor()
            slow = MirroringMember(relay.url, FACTION, start)
            steady = MirroringMember(relay.url, FACTION, start)
            for member in (slow, steady):
                await member.load_state()
            reading, never = trio.Event(), trio.Event()
            stopped, resumed = trio.Event(), trio.Event()
            stopped.set()
            async with trio.open_nursery() as members:
                members.start_soon(getattr(slow, transport), stopped, resumed)
                members.start_soon(getattr(steady, transport), never, reading)
                await slow.streaming.wait()
                await steady.streaming.wait()

                # Paced, so that a member who reads keeps up: the window is 50 events.
                await fake_upstream.flood("war_calls", padded_call, BURST, per_second=BURST_PER_S)
                await eventually(lambda: stored(relay, Source.UPSTREAM) == BURST)
                newest = relay.store.cursor()
                # The steady member keeps up while the slow one is held back.
                await eventually(lambda: steady.cursor >= newest)
                resumed.set()
                await eventually(lambda: slow.cursor >= newest)
                members.cancel_scope.cancel()
        relay.stop()
    upstream = sorted(fake_upstream.rows("war_calls"), key=lambda row: row["id"])
    assert len(upstream) == BURST
    assert slow.truncations >= 1  # it fell behind the window: told, and healed
    assert slow.table("war_calls") == upstream
    assert steady.table("war_calls") == upstream
    assert steady.truncations == 0
    assert steady.events == BURST  # every call live, once
