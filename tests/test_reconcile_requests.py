"""Asking for a reconcile before its time (`Reconciler.request`): something upstream said may have been
missed, so the next reconcile runs as soon as the one in progress has ended, once however often it
was asked for. Virtual time: the REST read and the store are the reconciler's injected callables."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from relay.config import ChannelConfig
from relay.upstream.backoff import Backoff
from relay.upstream.reconcile import Reconciler
from relay.upstream.snapshot import Snapshot
from tests.helpers.factions import FACTION
from tests.helpers.waits import eventually

pytestmark = pytest.mark.virtual_time

INTERVAL_S = 300.0
READ_S = 2.0
CHANNEL = ChannelConfig("war_calls", "faction_id=eq.{faction_id}")


class Upstream:
    """A REST read that takes READ_S, and a store that stores nothing, both counted."""

    def __init__(self) -> None:
        self.reads_started: list[float] = []

    async def read(self, table: str, realtime_filter: str, key: str) -> Snapshot:
        self.reads_started.append(trio.current_time())
        await trio.sleep(READ_S)
        return Snapshot(rows=[], requests=1)

    async def apply(self, *_: Any) -> int:
        return 0


def reconciler_of(upstream: Upstream) -> Reconciler:
    return Reconciler(
        FACTION,
        [CHANNEL],
        upstream.read,
        upstream.apply,
        interval_s=INTERVAL_S,
        backoff=Backoff(1.0, 60.0),
        wall_clock_ms=lambda: 0,
    )


async def test_a_request_reconciles_at_once_and_requests_meanwhile_are_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    upstream = Upstream()
    reconciler = reconciler_of(upstream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconciler.run_while_live)
        await eventually(lambda: reconciler.statistics().reconciles == 1)
        await trio.sleep(10)
        asked_at = trio.current_time()
        reconciler.request("a second Subscribed")
        reconciler.request("and again")
        await eventually(lambda: reconciler.statistics().reconciles == 2)
        assert upstream.reads_started[1] == pytest.approx(asked_at)
        await eventually(lambda: len(upstream.reads_started) == 3)  # then the interval, as before
        assert upstream.reads_started[2] - upstream.reads_started[1] == pytest.approx(READ_S + INTERVAL_S)
        nursery.cancel_scope.cancel()
    assert reconciler.statistics().requested == 2


async def test_a_request_during_a_read_asks_for_one_more_right_after_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """What was missed may have been committed after the read in progress began."""
    upstream = Upstream()
    reconciler = reconciler_of(upstream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconciler.run_while_live)
        await eventually(lambda: len(upstream.reads_started) == 1)
        reconciler.request("a change that could not be applied")
        await eventually(lambda: len(upstream.reads_started) == 2)
        assert upstream.reads_started[1] - upstream.reads_started[0] == pytest.approx(READ_S)
        nursery.cancel_scope.cancel()
