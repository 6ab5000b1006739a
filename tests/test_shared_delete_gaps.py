"""DELETEs the shared socket missed: under DEFAULT replica identity the relay-wide DELETE socket is the
only way a DELETE arrives, and Realtime never replays, so each time it is live again every faction
reconciles. Real loopback sockets and the real clock; every wait is bounded; the periodic reconcile is
300 s away, so the row comes back only through the reconcile asked for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from relay.config import Config
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, OTHER_FACTION
from tests.helpers.upstream_relay import (
    TIMEOUT_S,
    call,
    changes,
    fake_rows,
    reconciles,
    requested,
    rows,
    settled,
    shared_deletes,
    start,
    until_ids,
)
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e


async def test_a_delete_made_while_the_shared_socket_was_down_is_reconciled_when_it_is_back(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    relay = await start(nursery, make_config, factions=(FACTION, OTHER_FACTION))
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: shared_deletes(relay).state == "connected")
        await eventually(lambda: reconciles(relay) >= 1 and reconciles(relay, OTHER_FACTION) >= 1)
        fake_upstream.insert("war_calls", call(1))
        fake_upstream.insert("war_calls", call(2, OTHER_FACTION))
        await until_ids(relay, [1])
        await until_ids(relay, [2], OTHER_FACTION)
        asked = requested(relay, OTHER_FACTION)
        faction_sockets = {*fake_upstream.connections_with(str(FACTION))}
        faction_sockets |= {*fake_upstream.connections_with(str(OTHER_FACTION))}
        shared = [c for c in fake_upstream.connections if c not in faction_sockets]
        assert len(shared) == 1
        fake_upstream.freeze(shared)  # down: the DELETE reaches no channel at all
        fake_upstream.delete("war_calls", 1)
        fake_upstream.drop_connections(only=shared)
        await until_ids(relay, [])
        # Every faction asked, not only the one that lost a row: the relay cannot know whose it was.
        await eventually(lambda: requested(relay, OTHER_FACTION) > asked)
    assert changes((await relay.store.read_since(FACTION, None))[0]) == [
        ("INSERT", 1, False),
        ("DELETE", 1, True),
    ]
    assert await rows(relay) == fake_rows(fake_upstream) == []
    assert (
        await rows(relay, OTHER_FACTION)
        == fake_rows(fake_upstream, OTHER_FACTION)
        == [call(2, OTHER_FACTION)]
    )


async def test_a_shared_delete_during_the_first_snapshot_read_does_not_bring_the_row_back(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    fake_upstream.insert("war_calls", call(1), deliver=False)
    fake_upstream.insert("war_calls", call(2), deliver=False)
    fake_upstream.rest_hold = trio.Event()
    relay = await start(nursery, make_config)
    with trio.fail_after(TIMEOUT_S):
        # The first snapshot of war_calls is read (rows 1 and 2), its answer held back...
        await fake_upstream.wait_until(lambda: fake_upstream.rest_request_count == 1)
        await eventually(lambda: shared_deletes(relay).state == "connected")
        # ...while row 2 is deleted: the relay holds no row 2 yet, so the shared DELETE has no owner.
        fake_upstream.delete("war_calls", 2)
        await eventually(lambda: shared_deletes(relay).changes_received == 1)
        fake_upstream.rest_hold.set()
        await eventually(lambda: reconciles(relay) >= 1)
        await settled(relay)
    # Had the read brought row 2 back, /state would show a deleted call, and the next reconcile would
    # announce its deletion. The first read is the faction's baseline: rows, no events.
    assert changes((await relay.store.read_since(FACTION, None))[0]) == []
    assert await rows(relay) == fake_rows(fake_upstream) == [call(1)]
