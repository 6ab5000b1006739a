"""The relay against the socket-side behaviours of the real Realtime server over time (issue 17,
audit findings 2, 5, 6, 7 and 8), each turned on by a switch of the fake.

Virtual time against the fake over loopback. The reconciler's REST read is the fake's own rows (as
`tests/test_reconcile_requests.py` injects its read), and what it would store is kept in a list, so
no worker thread lets the autojump clock jump while a change is stored. One end-to-end test at the
end: the misconfigured state as an operator sees it, in /status and /metrics of the running relay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from relay.config import ChannelConfig
from relay.service import RunningRelay
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.backoff import Backoff
from relay.upstream.connection import LIVE_DEADLINE_S
from relay.upstream.phoenix import ChangeReceived
from relay.upstream.reconcile import Reconciler
from relay.upstream.snapshot import Snapshot
from relay.upstream.supervisor import (
    COLD_START_RECONCILE_S,
    MISCONFIGURED_RETRY_S,
    Supervisors,
    UpstreamState,
)
from tests.helpers.factions import FACTION
from tests.helpers.supervisors import HEARTBEAT_S, Collected, call, war_calls_settings
from tests.helpers.userscript import Userscript, read_status
from tests.helpers.waits import eventually

A = 46666
INTERVAL_S = 300.0
TIMEOUTS = '{:error, "Too many database timeouts"}'
NOT_PUBLISHED = (
    "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given"
    " connect parameters: [event: *, schema: public, table: war_calls, filters: [...]]"
)


@dataclass
class Reconciles:
    """Every snapshot the reconciler would compare: when it was read and the keys upstream held."""

    fake: FakeSupabase
    reads: list[tuple[float, set[Any]]] = field(default_factory=list)

    async def read(self, table: str, realtime_filter: str, key: str) -> Snapshot:
        faction = int(realtime_filter.removeprefix("faction_id=eq."))
        keys = {row[key] for row in self.fake.rows(table) if row["faction_id"] == faction}
        self.reads.append((trio.current_time(), keys))
        return Snapshot(rows=[], requests=1)

    async def apply(self, *_: Any) -> int:
        return 0

    def read_since(self, moment: float, key: Any) -> bool:
        return any(at >= moment and key in keys for at, keys in self.reads)


@dataclass
class Harness:
    fake: FakeSupabase
    supervisors: Supervisors
    collected: Collected
    reconciles: Reconciles
    shared: list[ChangeReceived]

    def stats(self) -> Any:
        return self.supervisors.statistics()[A]

    async def wait_state(self, state: UpstreamState) -> None:
        await eventually(lambda: self.stats().state == state)


async def start(
    nursery: trio.Nursery, *, shared_deletes: bool = False, two_channels: bool = False, before: Any = None
) -> Harness:
    fake = FakeSupabase(valid_keys=("anon",))
    await nursery.start(fake.run)
    if before is not None:
        before(fake)
    channels = [
        ChannelConfig(
            "war_calls", "faction_id=eq.{faction_id}", deletes="shared" if shared_deletes else "filtered"
        )
    ]
    if two_channels:
        channels.append(ChannelConfig("faction_messages", "faction_id=eq.{faction_id}", deletes="filtered"))
    settings = war_calls_settings(fake.url, channels=channels)
    reconciles = Reconciles(fake)

    def reconciler_for(faction_id: int) -> Reconciler:
        return Reconciler(
            faction_id,
            channels,
            reconciles.read,
            reconciles.apply,
            interval_s=INTERVAL_S,
            backoff=Backoff(1.0, 60.0),
            wall_clock_ms=lambda: 0,
        )

    collected = Collected()
    shared: list[ChangeReceived] = []

    async def route(changes: Any) -> None:
        shared.extend(changes)

    supervisors = Supervisors(
        settings,
        collected.ingest,
        rng=random.Random(3),
        wall_clock_ms=lambda: 1_000,
        reconciler_for=reconciler_for,
        route_shared_deletes=route if shared_deletes else None,
    )
    await nursery.start(supervisors.run, [A])
    return Harness(fake, supervisors, collected, reconciles, shared)


@pytest.mark.virtual_time
async def test_a_write_in_the_cold_start_window_is_reconciled_seconds_after_going_live(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """ "Subscribed" came before capture ran: the change is never sent, and the reconcile at going live
    read before it was committed. The second one, COLD_START_RECONCILE_S later, finds it."""
    with trio.fail_after(60):
        harness = await start(nursery, before=lambda fake: fake.cold_start(8.0))
        await harness.wait_state(UpstreamState.CONNECTED)
        live_at = trio.current_time()
        await eventually(lambda: harness.stats().reconcile.reconciles == 1)
        committed_at = trio.current_time()
        harness.fake.insert("war_calls", call(A, 1))
        await eventually(lambda: harness.reconciles.read_since(committed_at, 1))
    assert trio.current_time() - live_at == pytest.approx(COLD_START_RECONCILE_S, abs=0.1)
    assert harness.collected.types(A) == []  # the socket never sent it: only the reconcile has it
    assert harness.stats().reconcile.reconciles == 2


@pytest.mark.virtual_time
async def test_a_join_onto_capture_running_for_a_while_costs_one_full_read_not_two(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Another connection of the relay has been live for the cold start's window, so capture runs
    and "Subscribed" is not early: a faction joining then (a new one, or one healing a dropped
    socket) reconciles once, at going live."""
    b = A + 1
    with trio.fail_after(120):
        harness = await start(nursery)
        await harness.wait_state(UpstreamState.CONNECTED)
        await eventually(lambda: harness.stats().reconcile.reconciles == 2)  # cold: at live, and 12 s on
        harness.supervisors.ensure_running(b)
        await eventually(lambda: harness.supervisors.statistics()[b].state == UpstreamState.CONNECTED)
        await eventually(lambda: reconciles(harness, b) == 1)
        # The socket of A drops and comes back once B has been live a while: A's rejoin reads once too.
        await trio.sleep(COLD_START_RECONCILE_S)
        harness.fake.drop_connections(only=harness.fake.connections_with(str(A)))
        await eventually(
            lambda: harness.stats().reconnects == 1 and harness.stats().reconcile.reconciles == 3
        )
        await trio.sleep(COLD_START_RECONCILE_S * 2)
    assert harness.stats().reconcile.reconciles == 3
    assert reconciles(harness, b) == 1


def reconciles(harness: Harness, faction_id: int) -> int:
    stats = harness.supervisors.statistics()[faction_id].reconcile
    return stats.reconciles if stats is not None else 0


@pytest.mark.virtual_time
async def test_a_second_subscribed_asks_for_a_reconcile_that_covers_the_gap(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(120):
        harness = await start(nursery)
        await harness.wait_state(UpstreamState.CONNECTED)
        await eventually(lambda: harness.stats().reconcile.reconciles == 2)  # at live, and the cold start's
        harness.fake.resubscribe(gap_s=3.0)
        committed_at = trio.current_time()
        harness.fake.insert("war_calls", call(A, 1))  # in the gap: never sent
        await eventually(lambda: harness.reconciles.read_since(committed_at, 1))
        # Read as soon as "Subscribed" came again, not at the next interval.
        assert trio.current_time() - committed_at == pytest.approx(3.0, abs=0.1)
        assert harness.stats().resubscriptions == 1
        harness.fake.insert("war_calls", call(A, 2))  # after it, live again
        await eventually(lambda: harness.collected.types(A) == ["INSERT"])
    assert harness.stats().state == UpstreamState.CONNECTED
    assert harness.stats().reconcile.requested >= 2
    assert harness.stats().reconnects == 0


@pytest.mark.virtual_time
async def test_a_second_subscribed_on_the_shared_delete_socket_reconciles_every_faction(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A DELETE in the gap may be any faction's: each one's own reconcile finds its own. Under
    REPLICA IDENTITY DEFAULT a DELETE reaches only the relay-wide channel (its old row is the key)."""
    with trio.fail_after(120):
        harness = await start(
            nursery,
            shared_deletes=True,
            before=lambda fake: fake.define_table("war_calls", replica_identity="default"),
        )
        await harness.wait_state(UpstreamState.CONNECTED)
        await eventually(lambda: harness.stats().reconcile.reconciles == 2)  # at live, and the cold start's
        harness.fake.insert("war_calls", call(A, 1))
        await eventually(lambda: harness.collected.types(A) == ["INSERT"])
        harness.fake.resubscribe(gap_s=3.0, only=harness.fake.connections_with("delete"))
        committed_at = trio.current_time()
        harness.fake.delete("war_calls", 1)  # in the gap: never sent to the DELETE channel
        await eventually(lambda: harness.stats().reconcile.reconciles == 3)
        assert trio.current_time() - committed_at == pytest.approx(3.0, abs=0.1)
    shared = harness.supervisors.shared_deletes_statistics()
    assert shared is not None
    assert (shared.resubscriptions, harness.stats().resubscriptions) == (1, 0)
    assert harness.shared == []  # the DELETE only the reconcile can find
    assert harness.collected.types(A) == ["INSERT"]
    read_at, keys = harness.reconciles.reads[-1]
    assert (round(read_at - committed_at, 1), keys) == (3.0, set())


@pytest.mark.virtual_time
async def test_a_transient_error_keeps_the_socket_and_waits_for_the_servers_retry(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    def transient(fake: FakeSupabase) -> None:
        fake.retry_subscriptions = True
        fake.fail_subscriptions(TIMEOUTS, count=2)

    with trio.fail_after(60):
        harness = await start(nursery, before=transient)
        await eventually(lambda: harness.stats().subscription_retries == 1)
        assert harness.stats().state == UpstreamState.CONNECTING
        assert TIMEOUTS in (harness.stats().last_error or "")
        await harness.wait_state(UpstreamState.CONNECTED)
    assert 10.0 <= trio.current_time() <= 20.0  # two of the server's 5-10 s retries
    assert harness.stats().subscription_retries == 2
    assert harness.fake.upgrade_attempts == 1  # the same socket, the same join
    assert harness.fake.joins == 1
    assert harness.stats().reconnects == 0


@pytest.mark.virtual_time
async def test_a_transient_error_on_a_live_channel_is_waited_for_then_reconciled(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(120):
        harness = await start(nursery, before=lambda fake: setattr(fake, "retry_subscriptions", True))
        await harness.wait_state(UpstreamState.CONNECTED)
        harness.fake.resubscribe(error=TIMEOUTS)  # the re-subscription fails; the server retries it
        await harness.wait_state(UpstreamState.CONNECTING)
        await harness.wait_state(UpstreamState.CONNECTED)
        assert harness.stats().resubscriptions == 1
    assert harness.fake.upgrade_attempts == 1
    assert harness.stats().reconnects == 0


@pytest.mark.virtual_time
async def test_the_wait_for_the_servers_retries_is_bounded(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    def failing(fake: FakeSupabase) -> None:
        fake.retry_subscriptions = True
        fake.fail_subscriptions(TIMEOUTS)  # every retry fails

    with trio.fail_after(120):
        harness = await start(nursery, before=failing)
        await harness.wait_state(UpstreamState.BACKOFF)
    assert trio.current_time() == pytest.approx(LIVE_DEADLINE_S, abs=0.1)
    assert "not live after 60 s" in (harness.stats().last_error or "")
    assert TIMEOUTS in (harness.stats().last_error or "")
    assert harness.stats().subscription_retries >= 6


@pytest.mark.virtual_time
async def test_a_final_error_is_misconfigured_with_the_servers_message_and_retried_slowly(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(MISCONFIGURED_RETRY_S * 2):
        harness = await start(nursery, before=lambda fake: fake.fail_subscriptions(NOT_PUBLISHED))
        await harness.wait_state(UpstreamState.MISCONFIGURED)
        failed_at = trio.current_time()
        stats = harness.stats()
        assert NOT_PUBLISHED in (stats.last_error or "")
        assert stats.misconfigurations == 1
        assert stats.next_attempt_in_s == pytest.approx(MISCONFIGURED_RETRY_S, abs=0.1)
        harness.fake.accept_subscriptions()  # the operator adds the table to the publication
        await harness.wait_state(UpstreamState.CONNECTED)
    assert trio.current_time() - failed_at == pytest.approx(MISCONFIGURED_RETRY_S, abs=0.5)
    assert harness.fake.upgrade_attempts == 2


@pytest.mark.virtual_time
async def test_changes_of_another_type_than_the_shared_delete_binding_are_dropped_and_counted(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A server before the 2025-11 migrations sends every INSERT and UPDATE of the table to the
    relay-wide DELETE channel; routing them would serve a moved row to its old faction."""
    with trio.fail_after(60):
        harness = await start(
            nursery, shared_deletes=True, before=lambda fake: setattr(fake, "filter_by_action", False)
        )
        await harness.wait_state(UpstreamState.CONNECTED)
        await eventually(
            lambda: (
                (shared := harness.supervisors.shared_deletes_statistics()) is not None
                and shared.state == UpstreamState.CONNECTED
            )
        )
        harness.fake.insert("war_calls", call(A, 1))
        harness.fake.update("war_calls", 1, {"faction_id": 11581})  # moved to another faction
        harness.fake.delete("war_calls", 1)
        await eventually(lambda: len(harness.shared) == 1)
        shared = harness.supervisors.shared_deletes_statistics()
        assert shared is not None
        await eventually(lambda: harness.supervisors.shared_deletes_statistics().changes_ignored == 2)  # type: ignore[union-attr]
    assert [change.data["eventType"] for change in harness.shared] == ["DELETE"]


@pytest.mark.virtual_time
async def test_slow_joins_hold_the_heartbeat_reply_without_a_heartbeat_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Two 27 s joins (a cold project: 15 s for the database connection, the 5 s join-error sleep, the
    muster wait) put the first heartbeat's reply 54 s after it was sent, with no frame at all for the
    first 27 s: the reply deadline starts when the joins are answered. (A gap under one heartbeat
    interval between frames was already waited out: a reply queued behind data.)"""
    join_s = 27.0
    with trio.fail_after(300):
        harness = await start(
            nursery, two_channels=True, before=lambda fake: setattr(fake, "join_delay_s", join_s)
        )
        await harness.wait_state(UpstreamState.CONNECTED)
        assert trio.current_time() == pytest.approx(2 * join_s, abs=0.1)
        (connection,) = harness.fake.connections
        await harness.fake.wait_until(lambda: connection.heartbeats >= 4)  # and the later ones on time
    assert join_s > HEARTBEAT_S
    assert harness.fake.upgrade_attempts == 1
    assert harness.stats().reconnects == 0
    assert harness.stats().last_error is None


@pytest.mark.virtual_time
async def test_joins_never_answered_are_named_as_the_cause(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(120):
        harness = await start(nursery, before=lambda fake: setattr(fake, "join_delay_s", 90.0))
        await harness.wait_state(UpstreamState.BACKOFF)
    assert trio.current_time() == pytest.approx(LIVE_DEADLINE_S, abs=0.1)
    assert "1 join(s) not answered after 60 s" in (harness.stats().last_error or "")


@pytest.mark.e2e
async def test_misconfigured_shows_in_status_and_metrics_with_the_servers_message(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    fake_upstream.fail_subscriptions(NOT_PUBLISHED)
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url, timeout=10) as http:
            await Userscript(http, FACTION).start()
            while True:
                factions = {f["faction_id"]: f for f in (await read_status(http))["factions"]}
                upstream = factions.get(FACTION, {}).get("upstream", {})
                if upstream.get("state") == "misconfigured":
                    break
                await trio.sleep(0.05)
            metrics = (await http.get("/metrics")).text
    assert NOT_PUBLISHED in upstream["last_error"]
    assert upstream["next_attempt_in_s"] > MISCONFIGURED_RETRY_S - 5
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    label = ("faction_id", str(FACTION))
    assert samples[("cat_relay_upstream_state", (label, ("state", "misconfigured")))] == 1
    assert samples[("cat_relay_upstream_misconfigured_total", (label,))] == 1
