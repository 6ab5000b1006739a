"""The shapes of the records the real server sends, end to end: the relay against the fake's Realtime
socket and REST reads with each switch on (reference audit, findings 9-11).

- RLS: a DELETE's `old_record` is the key only, even under REPLICA IDENTITY FULL, yet it still reaches
  the faction's filtered channel; the relay serves it with the whole old row.
- TOAST: an UPDATE under DEFAULT identity leaves out an unchanged long value; the stored row keeps it.
- Error records (`Error 413` with values over 64 bytes left out; `Error 400`/`401` with no row) never
  become a stored row; each asks for a reconcile, which brings the row whole.

Real loopback sockets and the real clock (the store uses worker threads); every wait is bounded. The
periodic reconcile is 300 s away, so a reconcile after the first is one the relay asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay
from relay.testing.fake_supabase import FakeSupabase
from relay.testing.fake_tables import NO_PRIMARY_KEY, PAYLOAD_TOO_LARGE, TOAST_BYTES, UNAUTHORIZED
from tests.helpers.factions import FACTION, OTHER_FACTION
from tests.helpers.upstream_relay import (
    TIMEOUT_S,
    applied,
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

# Random-looking, so that it would be TOASTed out of line rather than compressed in it.
LONG_NOTE = "".join(f"{n * 7919 % 10007:05d}" for n in range(TOAST_BYTES // 4))


async def events_of(relay: RunningRelay, faction_id: int = FACTION) -> list[dict[str, Any]]:
    return [event.data() for event in (await relay.store.read_since(faction_id, None))[0]]


@pytest.mark.parametrize("deletes", ["shared", "filtered"])
async def test_a_key_only_delete_under_rls_is_served_whole_and_stored_once(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase, deletes: str
) -> None:
    # FULL, as the README asks for with `deletes = "filtered"`; RLS, as Supabase asks for on every table.
    fake_upstream.define_table("war_calls", replica_identity="full", rls=True)
    toml = "" if deletes == "shared" else _filtered_war_calls()
    relay = await start(nursery, make_config, toml)
    with trio.fail_after(TIMEOUT_S):
        await eventually(lambda: reconciles(relay) == 1)
        if deletes == "shared":
            await eventually(lambda: shared_deletes(relay).state == "connected")
        fake_upstream.insert("war_calls", call(1))
        await until_ids(relay, [1])
        fake_upstream.delete("war_calls", 1)  # old_record {"id": 1} on every channel that gets it
        fake_upstream.insert("war_calls", call(2))  # a later change: every DELETE copy came before it
        await until_ids(relay, [2])
        if deletes == "shared":
            await eventually(lambda: shared_deletes(relay).changes_received == 1)
    events = await events_of(relay)
    assert [(e["eventType"], e.get("resync", False)) for e in events] == [
        ("INSERT", False),
        ("DELETE", False),
        ("INSERT", False),
    ]
    assert events[1]["old"] == call(1)  # today's script reads old.target_id
    assert await rows(relay) == fake_rows(fake_upstream)


def _filtered_war_calls() -> str:
    # The default channels with war_calls' DELETEs taken from its own filtered channel.
    return (
        "[[upstream.channels]]\ntable = 'war_calls'\nfilter = 'faction_id=eq.{faction_id}'\n"
        "deletes = 'filtered'\n"
        "[[upstream.channels]]\ntable = 'faction_messages'\nfilter = 'faction_id=eq.{faction_id}'\n"
        "[[upstream.channels]]\ntable = 'wars'\nfilter = 'faction_id=eq.{faction_id}'\n"
    )


async def test_an_update_without_its_unchanged_long_value_keeps_it(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    fake_upstream.toast_bytes = TOAST_BYTES
    relay = await start(nursery, make_config)
    with trio.fail_after(TIMEOUT_S):
        await settled(relay)
        fake_upstream.insert("war_calls", call(1, note=LONG_NOTE))
        await until_ids(relay, [1])
        asked, done = requested(relay), reconciles(relay)
        fake_upstream.update("war_calls", 1, {"caller_name": "bob"})  # record without `note`
        await eventually(lambda: relay.store.kept_count(FACTION) == 2)
        # The relay cannot tell an unchanged TOAST value from a column dropped upstream: it checks.
        assert requested(relay) == asked + 1
        await eventually(lambda: reconciles(relay) > done)
    events = await events_of(relay)
    assert [e["eventType"] for e in events] == ["INSERT", "UPDATE"]  # the check found nothing to heal
    assert events[1]["new"] == call(1, note=LONG_NOTE, caller_name="bob")
    assert events[1]["old"] == call(1, note=LONG_NOTE)
    assert await rows(relay) == fake_rows(fake_upstream) == [call(1, note=LONG_NOTE, caller_name="bob")]
    assert relay.store.statistics().changes_incomplete == 1


async def test_a_413_record_never_replaces_a_row_and_a_reconcile_brings_it_whole(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase
) -> None:
    relay = await start(nursery, make_config)
    with trio.fail_after(TIMEOUT_S):
        await settled(relay)
        fake_upstream.insert("war_calls", call(1, note="short"))
        await until_ids(relay, [1])
        asked = requested(relay)
        fake_upstream.max_record_bytes = 1_000  # the real limit is 1 MiB; a long note passes this one
        fake_upstream.update("war_calls", 1, {"note": LONG_NOTE, "caller_name": "bob"})
        fake_upstream.insert("war_calls", call(2, note=LONG_NOTE))
        await eventually(lambda: relay.store.kept_count(FACTION) == 5)  # two as sent, two resync
    events = await events_of(relay)
    # Served as realtime-js hands them over, `errors` and all; then the reconcile's whole rows.
    assert changes([*(await relay.store.read_since(FACTION, None))[0]]) == [
        ("INSERT", 1, False),
        ("UPDATE", 1, False),
        ("INSERT", 2, False),
        ("UPDATE", 1, True),
        ("INSERT", 2, True),
    ]
    assert events[1]["errors"] == events[2]["errors"] == [PAYLOAD_TOO_LARGE]
    assert "note" not in events[1]["new"]
    assert "note" not in events[2]["new"]
    assert events[3]["old"] == call(1, note="short")  # the stored row was never the truncated one
    expected = [call(1, note=LONG_NOTE, caller_name="bob"), call(2, note=LONG_NOTE)]
    assert await rows(relay) == fake_rows(fake_upstream) == expected
    assert applied((await relay.store.read_since(FACTION, None))[0]) == expected
    assert requested(relay) > asked
    async with httpx.AsyncClient(base_url=relay.url) as http:
        metrics = (await http.get("/metrics")).text
    assert "cat_relay_upstream_changes_incomplete_total 2.0" in metrics


@pytest.mark.parametrize("error", [NO_PRIMARY_KEY, UNAUTHORIZED])
async def test_a_record_without_a_row_asks_every_faction_for_a_reconcile(
    nursery: trio.Nursery, make_config: Callable[..., Config], fake_upstream: FakeSupabase, error: str
) -> None:
    relay = await start(nursery, make_config, factions=(FACTION, OTHER_FACTION))
    with trio.fail_after(TIMEOUT_S):
        await settled(relay, OTHER_FACTION)
        asked = requested(relay, OTHER_FACTION)
        fake_upstream.error_records = error
        fake_upstream.insert("war_calls", call(1))  # sent to both factions' channels, with no row
        await eventually(lambda: relay.store.kept_count(FACTION) == 2)  # as sent, then resync
        await eventually(lambda: relay.store.kept_count(OTHER_FACTION) == 1)
        assert requested(relay, OTHER_FACTION) == asked + 1
    events = await events_of(relay)
    assert [(e["eventType"], e["new"], e["errors"], e["commit_timestamp"]) for e in events[:1]] == [
        ("INSERT", {}, [error], None)
    ]
    assert [(e["eventType"], e["new"], e.get("resync")) for e in events[1:]] == [("INSERT", call(1), True)]
    assert await rows(relay) == fake_rows(fake_upstream) == [call(1)]
    other = await events_of(relay, OTHER_FACTION)
    assert [(e["eventType"], e["errors"]) for e in other] == [("INSERT", [error])]
    assert await rows(relay, OTHER_FACTION) == []
