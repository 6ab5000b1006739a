"""All factions' upstream backlogs together, with the batches being stored, hold at most
`UpstreamBytes.max_bytes` of frames: past it the fullest backlog drops its oldest change, so a faction
sent large rows (or flooded) pays, and the others keep theirs (`relay/upstream/connection.py`)."""

from __future__ import annotations

import pytest

from relay.upstream.connection import Backlog, UpstreamBytes
from relay.upstream.phoenix import ChangeReceived

pytestmark = pytest.mark.unit


def change(n: int) -> ChangeReceived:
    return ChangeReceived(
        "war_calls", {"table": "war_calls", "eventType": "INSERT", "new": {"id": n}, "old": {}}
    )


def backlog(shared: UpstreamBytes, drops: list[str], name: str) -> Backlog:
    return Backlog(1_000, 1_000, shared, on_dropped=lambda count: drops.extend([name] * count))


async def test_past_the_relay_wide_bound_the_fullest_backlog_drops_its_oldest() -> None:
    shared, drops = UpstreamBytes(100), list[str]()
    flooded, quiet = backlog(shared, drops, "flooded"), backlog(shared, drops, "quiet")
    for n in range(5):
        flooded.put(change(n), 30)
    assert (shared.held, flooded.bytes, drops) == (90, 90, ["flooded", "flooded"])
    quiet.put(change(100), 30)  # the flooded faction makes room, not the quiet one
    assert (shared.held, quiet.bytes, drops.count("quiet")) == (90, 30, 0)
    taken, size = await flooded.take()
    assert [c.data["new"]["id"] for c in taken] == [3, 4]
    assert size == 60
    # Being stored still counts: memory is held until the commit returns.
    quiet.put(change(101), 30)
    quiet.put(change(102), 30)
    assert shared.held <= 100
    assert drops.count("quiet") == 2  # the only backlog holding anything: the newest stays
    flooded.stored(size)
    assert shared.held == quiet.bytes == 30


async def test_a_batch_being_stored_is_never_dropped_and_leaves_the_count_when_stored() -> None:
    shared, drops = UpstreamBytes(50), list[str]()
    only = backlog(shared, drops, "only")
    only.put(change(1), 40)
    taken, size = await only.take()
    only.put(change(2), 40)  # over the bound with the batch in flight: the waiting change goes
    assert (len(taken), len(only), drops) == (1, 0, ["only"])
    only.stored(size)
    assert shared.held == 0
