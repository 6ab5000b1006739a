"""Supervisors in virtual time against the fake Supabase over real loopback sockets.

No store here: the autojump clock must not see worker threads, so changes go to a list. Each test
names `autojump_clock` itself: pytest-trio only runs a test under a clock the test asks for directly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from relay.config import ChannelConfig
from relay.testing.fake_supabase import FakeSupabase
from relay.upstream.connection import (
    CLOSE_NOTICE_S,
    CLOSE_TIMEOUT_S,
    REPLY_PATIENCE_UNDER_DATA_S,
    ConnectionSettings,
)
from relay.upstream.supervisor import Supervisors, SupervisorSettings, UpstreamState
from tests.helpers.supervisors import (
    HEARTBEAT_S,
    INITIAL_S,
    KEY,
    MAX_S,
    Collected,
    call,
    war_calls_settings,
)
from tests.helpers.waits import eventually

pytestmark = pytest.mark.virtual_time

A, B = 46666, 11581
SEED = 4


@dataclass
class Harness:
    fake: FakeSupabase
    supervisors: Supervisors
    collected: Collected

    def state(self, faction_id: int) -> UpstreamState:
        return self.supervisors.statistics()[faction_id].state

    async def wait_state(self, faction_id: int, state: UpstreamState) -> None:
        await eventually(lambda: self.state(faction_id) == state)


@pytest.fixture
async def harness(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> Harness:
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    settings = war_calls_settings(fake.url)
    collected = Collected()
    supervisors = Supervisors(
        settings, collected.ingest, rng=random.Random(SEED), wall_clock_ms=lambda: 1_000
    )
    await nursery.start(supervisors.run, [A])
    return Harness(fake, supervisors, collected)


async def test_connected_only_after_subscribed_and_changes_flow_in_order(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    # FULL: this harness has no shared DELETE socket, so the DELETE must reach the faction's channel.
    harness.fake.define_table("war_calls", replica_identity="full")
    with trio.fail_after(30):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        stats = harness.supervisors.statistics()[A]
        assert (stats.attempts, stats.last_error, stats.connected_since) == (0, None, 1_000)
        harness.fake.insert("war_calls", call(A, 1))
        harness.fake.update("war_calls", 1, {"caller_name": "bob"})
        harness.fake.delete("war_calls", 1)
        await eventually(lambda: len(harness.collected.types(A)) >= 3)
    assert harness.collected.types(A) == ["INSERT", "UPDATE", "DELETE"]
    delete = harness.collected.changes[A][2].data
    assert delete["old"]["target_id"] == 901


async def test_dropped_socket_reconnects_after_the_jittered_delay(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        attempts_before = harness.fake.upgrade_attempts
        dropped_at = trio.current_time()
        harness.fake.drop_connections(None)
        await harness.wait_state(A, UpstreamState.BACKOFF)
        stats = harness.supervisors.statistics()[A]
        assert stats.last_error is not None
        assert "without a close frame" in stats.last_error
        await harness.fake.wait_until(lambda: harness.fake.upgrade_attempts > attempts_before)
        expected = random.Random(SEED).uniform(0.0, INITIAL_S)
        # Never before the seeded draw; real loopback I/O may let the autojump clock slip a few ms past it.
        assert expected <= trio.current_time() - dropped_at <= expected + 0.05
        await harness.wait_state(A, UpstreamState.CONNECTED)


async def test_refused_key_is_auth_failed_and_retried_at_the_capped_delay(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(600):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        harness.fake.valid_keys.clear()
        harness.fake.drop_connections(1012)
        await harness.wait_state(A, UpstreamState.BACKOFF)
        await harness.wait_state(A, UpstreamState.AUTH_FAILED)
        stats = harness.supervisors.statistics()[A]
        assert stats.last_error is not None
        assert "401" in stats.last_error
        assert stats.next_attempt_in_s is not None
        assert MAX_S / 2 <= stats.next_attempt_in_s <= MAX_S
        harness.fake.valid_keys.add(KEY)
        await harness.wait_state(A, UpstreamState.CONNECTED)


async def test_missing_heartbeat_reply_is_a_dead_socket_within_one_interval(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(300):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        heartbeats = harness.fake.connections[0].heartbeats
        await harness.fake.wait_until(lambda: harness.fake.connections[0].heartbeats > heartbeats)
        harness.fake.stop_heartbeat_replies()
        stopped_at = trio.current_time()
        await harness.wait_state(A, UpstreamState.BACKOFF)
        # The next heartbeat goes out within one interval and is declared dead one interval later.
        assert trio.current_time() - stopped_at <= 2 * HEARTBEAT_S + 0.1
        stats = harness.supervisors.statistics()[A]
        assert stats.last_error is not None
        assert "HeartbeatTimeout" in stats.last_error
        harness.fake.resume_heartbeat_replies()
        await harness.wait_state(A, UpstreamState.CONNECTED)


async def test_a_late_reply_while_frames_keep_coming_is_waited_for_up_to_the_servers_own_timeout(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    """Under a flood the reader can be behind the socket, the reply queued behind data: a socket
    still delivering is busy, not dead. It is cut once no reply came for REPLY_PATIENCE_UNDER_DATA_S,
    after which the real server would have closed it anyway."""
    with trio.fail_after(600):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        harness.fake.stop_heartbeat_replies()
        stopped_at = trio.current_time()

        async def keep_sending() -> None:
            for n in range(1_000):
                harness.fake.insert("war_calls", call(A, 100 + n))
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            await harness.wait_state(A, UpstreamState.BACKOFF)
            nursery.cancel_scope.cancel()
        held_for = trio.current_time() - stopped_at
        assert 2 * HEARTBEAT_S < held_for <= HEARTBEAT_S + REPLY_PATIENCE_UNDER_DATA_S + 0.1
        assert "HeartbeatTimeout" in (harness.supervisors.statistics()[A].last_error or "")
        assert len(harness.collected.types(A)) >= held_for - 1  # every change read meanwhile was stored


async def test_one_factions_channel_failing_leaves_the_other_flowing(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        harness.supervisors.ensure_running(B)
        await harness.wait_state(A, UpstreamState.CONNECTED)
        await harness.wait_state(B, UpstreamState.CONNECTED)
        harness.fake.fail_joins("RealtimeRestarting: Realtime is restarting, please standby")
        harness.fake.shutdown_channel(f"realtime:public:war_calls:faction_id=eq.{A}", "Node request timeout")
        await harness.wait_state(A, UpstreamState.BACKOFF)
        harness.fake.insert("war_calls", call(B, 2))
        await eventually(lambda: harness.collected.types(B) == ["INSERT"])
        assert harness.state(B) == UpstreamState.CONNECTED
        assert harness.supervisors.statistics()[B].reconnects == 0
        stats = harness.supervisors.statistics()[A]
        assert stats.last_error is not None
        assert "Node request timeout" in stats.last_error


async def test_backoff_grows_across_failures_and_resets_after_a_healthy_connection(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(900):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        harness.fake.refuse_upgrades(503, "Service Unavailable")
        harness.fake.drop_connections(None)
        first_refused = harness.fake.upgrade_attempts + 1
        await harness.fake.wait_until(lambda: harness.fake.upgrade_attempts >= first_refused + 4)
        assert harness.supervisors.statistics()[A].attempts >= 4
        harness.fake.accept_upgrades()
        await harness.wait_state(A, UpstreamState.CONNECTED)
        assert harness.supervisors.statistics()[A].attempts == 0
        await trio.sleep(31.0)  # longer than healthy_after_s: the failures are forgiven
        harness.fake.drop_connections(None)
        await harness.wait_state(A, UpstreamState.BACKOFF)
        next_in = harness.supervisors.statistics()[A].next_attempt_in_s
        assert next_in is not None
        assert next_in <= INITIAL_S


async def test_stop_closes_the_socket_and_shows_stopped(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        await harness.supervisors.stop(A)
        assert harness.state(A) == UpstreamState.STOPPED
        await harness.fake.wait_until(lambda: not harness.fake.connections)
        harness.supervisors.ensure_running(A)
        await harness.wait_state(A, UpstreamState.CONNECTED)


async def test_a_faction_revived_while_its_supervisor_is_stopping_gets_a_new_one(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        await harness.wait_state(A, UpstreamState.CONNECTED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.supervisors.stop, A)
            await trio.testing.wait_all_tasks_blocked()  # asked to stop; its socket is still closing
            assert harness.supervisors.statistics()[A].state == UpstreamState.CONNECTED
            harness.supervisors.ensure_running(A)
        await harness.wait_state(A, UpstreamState.CONNECTED)
        await harness.fake.wait_until(lambda: len(harness.fake.connections) == 1)


async def test_a_restart_with_150_factions_paces_its_joins(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    rate = 20.0
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    settings = SupervisorSettings(
        connection=ConnectionSettings(
            fake.url, KEY, heartbeat_interval_s=HEARTBEAT_S, connect_timeout_s=10.0
        ),
        channels=[
            ChannelConfig("war_calls", "faction_id=eq.{faction_id}"),
            ChannelConfig("faction_messages", "faction_id=eq.{faction_id}"),
        ],
        backoff_initial_s=INITIAL_S,
        backoff_max_s=MAX_S,
        joins_per_second=rate,
    )
    supervisors = Supervisors(settings, Collected().ingest, rng=random.Random(SEED), wall_clock_ms=lambda: 0)
    factions = list(range(1, 151))
    started = trio.current_time()
    joins_at: list[tuple[float, int]] = []

    async def record_joins() -> None:
        while True:
            joins_at.append((trio.current_time() - started, fake.joins))
            await trio.sleep(0.05)

    with trio.fail_after(120):
        nursery.start_soon(record_joins)
        await nursery.start(supervisors.run, factions)
        await eventually(
            lambda: all(stats.state == UpstreamState.CONNECTED for stats in supervisors.statistics().values())
        )
    finished = trio.current_time() - started
    # 300 channel joins at 20 a second: about 15 s, never a burst above the rate in any second.
    assert 14.0 <= finished <= 16.0
    for at, joins in joins_at:
        later = [count for when, count in joins_at if at < when <= at + 1.0]
        if later:
            assert max(later) - joins <= rate + 2, (at, joins, max(later))
    assert fake.upgrade_attempts == 150


async def test_nothing_listening_is_a_failed_connect_retried_with_backoff(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.socket.socket() as placeholder:  # a loopback port that is free, so nothing answers on it
        await placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    supervisors = Supervisors(
        war_calls_settings(f"ws://127.0.0.1:{port}/realtime/v1/websocket"),
        Collected().ingest,
        rng=random.Random(SEED),
        wall_clock_ms=lambda: 0,
    )
    with trio.fail_after(60):
        await nursery.start(supervisors.run, [A])
        await eventually(lambda: supervisors.statistics()[A].attempts >= 3)
    stats = supervisors.statistics()[A]
    assert stats.state == UpstreamState.BACKOFF
    assert stats.last_error is not None
    assert stats.last_error.startswith("ConnectFailed: cannot connect to 127.0.0.1:")


# --- stopping with upstreams that never answer the WebSocket close ---


async def test_150_hung_upstreams_close_in_parallel_within_the_close_notice(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Shutdown cancels every faction at once; each sends its close frame and waits CLOSE_NOTICE_S
    (shielded) for an answer that never comes: the whole stop takes one notice, not 150."""
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    supervisors = Supervisors(
        war_calls_settings(fake.url, joins_per_second=1_000.0),
        Collected().ingest,
        rng=random.Random(SEED),
        wall_clock_ms=lambda: 0,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as relay:
            await relay.start(supervisors.run, range(1, 151))
            await eventually(
                lambda: all(s.state == UpstreamState.CONNECTED for s in supervisors.statistics().values())
            )
            fake.freeze(answer_close=False)
            cancelled_at = trio.current_time()
            relay.cancel_scope.cancel()
        stopped_in = trio.current_time() - cancelled_at
    assert stopped_in == pytest.approx(CLOSE_NOTICE_S, abs=0.01)
    assert all(s.state == UpstreamState.STOPPED for s in supervisors.statistics().values())


async def test_a_stop_during_the_close_of_a_dead_socket_waits_a_second_at_most(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A connection that failed (here: no heartbeat reply) closes politely within CLOSE_TIMEOUT_S,
    shielded; a shutdown arriving meanwhile waits for the rest of it, so it must be short."""
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    supervisors = Supervisors(
        war_calls_settings(fake.url), Collected().ingest, rng=random.Random(SEED), wall_clock_ms=lambda: 0
    )
    with trio.fail_after(300):
        async with trio.open_nursery() as relay:
            await relay.start(supervisors.run, [A])
            await eventually(lambda: supervisors.statistics()[A].state == UpstreamState.CONNECTED)
            (connection,) = fake.connections
            heartbeats = connection.heartbeats
            await fake.wait_until(lambda: connection.heartbeats > heartbeats)
            heartbeat_at = trio.current_time()
            await trio.sleep(1.0)  # its reply delivered
            fake.freeze(answer_close=False)
            # The next heartbeat goes unanswered and is declared dead one interval after it is sent;
            # a moment later the connection is closing (still "connected" until its close returns).
            await trio.sleep_until(heartbeat_at + 2 * HEARTBEAT_S + 0.1)
            assert supervisors.statistics()[A].state == UpstreamState.CONNECTED
            cancelled_at = trio.current_time()
            relay.cancel_scope.cancel()
        stopped_in = trio.current_time() - cancelled_at
    assert stopped_in == pytest.approx(CLOSE_TIMEOUT_S - 0.1, abs=0.02)
    assert stopped_in <= 1.0
