"""The upstream fault matrix, in virtual time against the fake over loopback.

Each fault hits faction A's socket only; faction B keeps its socket and keeps receiving throughout.
For each: A's state and `last_error`, a reconnect after backoff, and A's events flowing again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio

from relay.testing.fake_supabase import FakeConnection, FakeSupabase
from relay.upstream.supervisor import MISCONFIGURED_RETRY_S, Supervisors, UpstreamState
from tests.helpers.supervisors import HEARTBEAT_S, KEY, MAX_S, Collected, call, war_calls_settings
from tests.helpers.waits import eventually

pytestmark = pytest.mark.virtual_time

A, B = 46666, 11581
TOPIC_A = f"realtime:public:war_calls:faction_id=eq.{A}"

Fault = Callable[[FakeSupabase, list[FakeConnection]], None]


@dataclass(frozen=True)
class Case:
    fault: Fault
    error: str  # what last_error must say
    state: UpstreamState = UpstreamState.BACKOFF
    clear: Callable[[FakeSupabase], None] = lambda fake: None
    min_delay_s: float = 0.0  # the least time before the next attempt


def drop_then(then: Callable[[FakeSupabase], None]) -> Fault:
    """Faults that only new sockets meet: A's socket is dropped so that A meets them, B's is kept."""

    def apply(fake: FakeSupabase, a: list[FakeConnection]) -> None:
        then(fake)
        fake.drop_connections(None, only=a)

    return apply


def delay_frames(fake: FakeSupabase, a: list[FakeConnection]) -> None:
    for connection in a:
        connection.frame_delay_s = HEARTBEAT_S * 2


CASES = {
    "abrupt close (1006)": Case(lambda f, a: f.drop_connections(None, only=a), "without a close frame"),
    "server close 1000 (idle)": Case(lambda f, a: f.drop_connections(1000, only=a), "closed with 1000"),
    "server requested disconnect (1012)": Case(
        lambda f, a: f.send_system_disconnect(only=a), "closed with 1012"
    ),
    "upgrade refused 503": Case(
        drop_then(lambda f: f.refuse_upgrades(503, "Service Unavailable")),
        "HTTP 503",
        clear=lambda f: f.accept_upgrades(),
    ),
    "upgrade refused 429": Case(
        drop_then(lambda f: f.refuse_upgrades(429, "Too many connected users")),
        "HTTP 429",
        clear=lambda f: f.accept_upgrades(),
        min_delay_s=30.0,
    ),
    "key refused (401)": Case(
        drop_then(lambda f: f.refuse_upgrades(401, "Failed to validate JWT signature")),
        "HTTP 401 Failed to validate JWT signature",
        state=UpstreamState.AUTH_FAILED,
        clear=lambda f: f.accept_upgrades(),
        min_delay_s=MAX_S / 2,
    ),
    "join answered with an error": Case(
        drop_then(lambda f: f.fail_joins("RealtimeRestarting: Realtime is restarting, please standby")),
        "join refused: RealtimeRestarting",
        clear=lambda f: f.accept_joins(),
    ),
    "system error after a successful join (bad filter)": Case(
        drop_then(lambda f: f.fail_subscriptions('Error parsing `filter` params: ["equals", "5"]')),
        "Error parsing `filter` params",
        state=UpstreamState.MISCONFIGURED,
        clear=lambda f: f.accept_subscriptions(),
        min_delay_s=MISCONFIGURED_RETRY_S,
    ),
    "heartbeat replies stop": Case(lambda f, a: f.stop_heartbeat_replies(only=a), "HeartbeatTimeout"),
    "server freezes completely": Case(lambda f, a: f.freeze(only=a), "HeartbeatTimeout"),
    "malformed frame": Case(lambda f, a: f.send_raw("{not json", only=a), "MalformedFrame"),
    "every frame delayed past the heartbeat deadline": Case(delay_frames, "HeartbeatTimeout"),
}


async def start(nursery: trio.Nursery) -> tuple[FakeSupabase, Supervisors, Collected]:
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    settings = war_calls_settings(fake.url)
    collected = Collected()
    supervisors = Supervisors(settings, collected.ingest, rng=random.Random(9), wall_clock_ms=lambda: 0)
    await nursery.start(supervisors.run, [A, B])
    await eventually(
        lambda: all(s.state == UpstreamState.CONNECTED for s in supervisors.statistics().values())
    )
    return fake, supervisors, collected


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_upstream_fault(nursery: trio.Nursery, autojump_clock: trio.abc.Clock, case: Case) -> None:
    with trio.fail_after(900):
        fake, supervisors, collected = await start(nursery)
        reconnects_before = supervisors.statistics()[A].reconnects
        case.fault(fake, fake.connections_with(f"eq.{A}"))
        # Faults that only new sockets meet show from A's next attempt on, after the drop itself.
        await eventually(
            lambda: (
                supervisors.statistics()[A].state == case.state
                and case.error in (supervisors.statistics()[A].last_error or "")
            )
        )
        next_attempt_in_s = supervisors.statistics()[A].next_attempt_in_s
        assert next_attempt_in_s is not None
        assert next_attempt_in_s >= case.min_delay_s - 0.05  # read within one look of the transition

        fake.insert("war_calls", call(B, 1))  # B is untouched while A is down
        await eventually(lambda: collected.types(B) == ["INSERT"])
        assert supervisors.statistics()[B].state == UpstreamState.CONNECTED

        case.clear(fake)
        await eventually(lambda: supervisors.statistics()[A].state == UpstreamState.CONNECTED)
        assert supervisors.statistics()[A].reconnects > reconnects_before
        fake.insert("war_calls", call(A, 2))
        await eventually(lambda: collected.types(A) == ["INSERT"])
    assert supervisors.statistics()[B].reconnects == 0


async def test_a_stale_phx_close_for_an_old_join_is_ignored(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(120):
        fake, supervisors, collected = await start(nursery)
        stale = json.dumps({"topic": TOPIC_A, "event": "phx_close", "payload": {}, "ref": "0"})
        fake.send_raw(stale, only=fake.connections_with(f"eq.{A}"))
        fake.insert("war_calls", call(A, 1))
        await eventually(lambda: collected.types(A) == ["INSERT"])
        await trio.sleep(HEARTBEAT_S * 3)  # virtual time: three heartbeat deadlines pass, exactly
    assert supervisors.statistics()[A].state == UpstreamState.CONNECTED
    assert supervisors.statistics()[A].reconnects == 0


async def test_frames_delayed_within_the_deadline_keep_the_connection(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(300):
        fake, supervisors, collected = await start(nursery)
        for connection in fake.connections_with(f"eq.{A}"):
            connection.frame_delay_s = 2.0
        fake.insert("war_calls", call(A, 1))
        await eventually(lambda: collected.types(A) == ["INSERT"])
        await trio.sleep(HEARTBEAT_S * 3)  # virtual time: three heartbeat deadlines pass, exactly
    assert supervisors.statistics()[A].state == UpstreamState.CONNECTED
    assert supervisors.statistics()[A].reconnects == 0
