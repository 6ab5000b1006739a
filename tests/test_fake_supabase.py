"""The fake Supabase Realtime, driven by a raw trio-websocket client over loopback: no relay code here."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from relay.testing.fake_supabase import FakeSupabase
from relay.testing.fake_tables import WAR_CALLS_COLUMNS
from relay.testing.war_traffic import generate_war_traffic

KEY = "test-anon-key"
A, B = 46666, 11581
TOPIC_A = f"realtime:public:war_calls:faction_id=eq.{A}"
TOPIC_B = f"realtime:public:war_calls:faction_id=eq.{B}"


def binding(faction_id: int | None, table: str = "war_calls") -> dict[str, Any]:
    entry: dict[str, Any] = {"event": "*", "schema": "public", "table": table}
    if faction_id is not None:
        entry["filter"] = f"faction_id=eq.{faction_id}"
    return entry


def call(faction_id: int, call_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "faction_id": faction_id,
        "target_id": 2_000_000 + call_id,
        "caller_name": "alice",
        **extra,
    }


class Client:
    """A bare vsn 1.0.0 client: numbered refs, join_ref on every channel message."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.ref = 0
        self.join_refs: dict[str, str] = {}

    async def push(self, topic: str, event: str, payload: dict[str, Any] | None = None) -> str:
        self.ref += 1
        ref = str(self.ref)
        frame = {"topic": topic, "event": event, "payload": payload or {}, "ref": ref}
        if event == "phx_join":
            self.join_refs[topic] = ref
        if topic in self.join_refs:
            frame["join_ref"] = self.join_refs[topic]
        await self.ws.send_message(json.dumps(frame))
        return ref

    async def join(self, topic: str, *entries: dict[str, Any]) -> str:
        return await self.push(topic, "phx_join", {"config": {"postgres_changes": list(entries)}})

    async def subscribe(self, topic: str, *entries: dict[str, Any]) -> dict[str, Any]:
        """Join and read up to "Subscribed to PostgreSQL"; the ok reply."""
        ref = await self.join(topic, *entries)
        reply = await self.recv()
        assert (reply["event"], reply["ref"], reply["payload"]["status"]) == ("phx_reply", ref, "ok")
        subscribed = await self.recv()
        assert subscribed["payload"]["message"] == "Subscribed to PostgreSQL"
        return reply

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.ws.get_message())
        assert set(frame) == {"topic", "event", "payload", "ref"}  # vsn 1.0.0: never join_ref
        return frame


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeSupabase:
    fake = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(fake.run)
    return fake


class Dialer:
    """Raw clients of the fake, each owning its TCP stream.

    trio-websocket's client closes its socket only when it starts the close itself; after a refusal, a
    server-initiated close or an abort it leaves the socket to the garbage collector, whose
    ResourceWarning is an error under `filterwarnings = error`. So the stream is opened and closed here.
    """

    def __init__(self, nursery: trio.Nursery, fake: FakeSupabase) -> None:
        self.nursery = nursery
        self.fake = fake

    @asynccontextmanager
    async def connect(
        self, query: str = f"apikey={KEY}&vsn=1.0.0", headers: list[tuple[bytes, bytes]] | None = None
    ) -> AsyncIterator[Client]:
        stream = await trio.open_tcp_stream("127.0.0.1", self.fake.port)
        async with stream:
            ws = await wrap_client_stream(self.nursery, stream, *self._target(query), extra_headers=headers)
            try:
                yield Client(ws)
            finally:
                with trio.move_on_after(1, shield=True):
                    await ws.aclose()

    async def refusal(self, query: str) -> ConnectionRejected:
        stream = await trio.open_tcp_stream("127.0.0.1", self.fake.port)
        async with stream:
            with pytest.RaisesGroup(ConnectionRejected) as refused:
                async with trio.open_nursery() as nursery:
                    await wrap_client_stream(nursery, stream, *self._target(query))
        rejected = refused.value.exceptions[0]
        assert isinstance(rejected, ConnectionRejected)
        return rejected

    def _target(self, query: str) -> tuple[str, str]:
        return f"127.0.0.1:{self.fake.port}", f"/realtime/v1/websocket?{query}"


@pytest.fixture
def dial(nursery: trio.Nursery, fake: FakeSupabase) -> Dialer:
    return Dialer(nursery, fake)


@pytest.mark.e2e
async def test_join_echoes_entries_with_content_ids_then_subscribed(fake: FakeSupabase, dial: Dialer) -> None:
    entries = [binding(A), binding(A, "faction_messages"), {"table": "war_calls"}]
    with trio.fail_after(5):
        async with dial.connect() as first, dial.connect() as second:
            ref = await first.join(TOPIC_A, *entries)
            reply = await first.recv()
            subscribed = await first.recv()
            again = await second.subscribe("realtime:another-label", *entries)
    assert (reply["topic"], reply["event"], reply["ref"], reply["payload"]["status"]) == (
        TOPIC_A,
        "phx_reply",
        ref,
        "ok",
    )
    echoed = reply["payload"]["response"]["postgres_changes"]
    assert [{k: v for k, v in e.items() if k != "id"} for e in echoed] == entries
    ids = [entry["id"] for entry in echoed]
    assert all(isinstance(i, int) and 0 <= i < 2**27 for i in ids)
    assert len(set(ids)) == 3
    assert [entry["id"] for entry in again["payload"]["response"]["postgres_changes"]] == ids
    assert subscribed == {
        "topic": TOPIC_A,
        "event": "system",
        "ref": None,
        "payload": {
            "channel": TOPIC_A.removeprefix("realtime:"),
            "extension": "postgres_changes",
            "status": "ok",
            "message": "Subscribed to PostgreSQL",
        },
    }
    assert fake.joins == 2


@pytest.mark.e2e
async def test_insert_update_delete_shapes_and_routing_by_filter(fake: FakeSupabase, dial: Dialer) -> None:
    fake.define_table("war_calls", replica_identity="full")  # the shapes under FULL; DEFAULT is below
    with trio.fail_after(5):
        async with dial.connect() as client:
            reply_a = await client.subscribe(TOPIC_A, binding(A))
            await client.subscribe(TOPIC_B, binding(B))
            fake.insert("war_calls", call(A, 1))
            fake.update("war_calls", 1, {"caller_name": "bob"})
            fake.update("war_calls", 1, {"faction_id": B})  # moves out of A: only B hears of it
            fake.delete("war_calls", 1)
            frames = [await client.recv() for _ in range(4)]
    a_id = reply_a["payload"]["response"]["postgres_changes"][0]["id"]
    insert, update, moved, delete = frames
    assert [f["topic"] for f in frames] == [TOPIC_A, TOPIC_A, TOPIC_B, TOPIC_B]
    assert all(f["event"] == "postgres_changes" and f["ref"] is None for f in frames)
    assert insert["payload"]["ids"] == [a_id]
    data = insert["payload"]["data"]
    assert set(data) == {"schema", "table", "commit_timestamp", "type", "columns", "record", "errors"}
    assert (data["schema"], data["table"], data["type"], data["errors"]) == (
        "public",
        "war_calls",
        "INSERT",
        None,
    )
    assert data["record"] == call(A, 1)
    assert {"name": "faction_id", "type": "int8"} in data["columns"]
    stamp = data["commit_timestamp"]
    assert (len(stamp), stamp[10], stamp[19], stamp[-1]) == (24, "T", ".", "Z")
    update_data = update["payload"]["data"]
    assert set(update_data) >= {"record", "old_record"}
    assert update_data["record"]["caller_name"] == "bob"
    assert update_data["old_record"] == call(A, 1)  # replica identity full: the whole previous row
    assert moved["payload"]["data"]["record"]["faction_id"] == B
    delete_data = delete["payload"]["data"]
    assert "record" not in delete_data
    assert delete_data["old_record"] == call(B, 1, caller_name="bob")


@pytest.mark.e2e
async def test_key_only_delete_skips_filtered_channels_unless_the_old_server_behaviour(
    fake: FakeSupabase,
    dial: Dialer,
) -> None:
    fake.define_table("war_calls", replica_identity="default")
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            await client.subscribe("realtime:all-calls", binding(None))
            fake.insert("war_calls", call(A, 1))
            fake.insert("war_calls", call(A, 2))
            assert [(await client.recv())["topic"] for _ in range(4)] == [TOPIC_A, "realtime:all-calls"] * 2
            fake.delete("war_calls", 1)
            unfiltered = await client.recv()
            fake.deliver_deletes_unfiltered = True
            fake.delete("war_calls", 2)
            second = [await client.recv() for _ in range(2)]
    assert unfiltered["topic"] == "realtime:all-calls"
    assert unfiltered["payload"]["data"]["old_record"] == {"id": 1}
    assert sorted(f["topic"] for f in second) == sorted([TOPIC_A, "realtime:all-calls"])
    assert all(f["payload"]["data"]["old_record"] == {"id": 2} for f in second)


@pytest.mark.e2e
async def test_ignore_filters_and_silent_changes(fake: FakeSupabase, dial: Dialer) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            fake.insert("war_calls", call(B, 1), deliver=False)
            fake.update("war_calls", 1, {"faction_id": A}, deliver=False)
            fake.insert("war_calls", call(A, 2))
            first = await client.recv()
            fake.ignore_filters = True
            fake.insert("war_calls", call(B, 3))
            second = await client.recv()
    assert first["payload"]["data"]["record"]["id"] == 2  # the outage gap never reached the socket
    assert second["payload"]["data"]["record"]["faction_id"] == B
    assert sorted(row["id"] for row in fake.rows("war_calls")) == [1, 2, 3]
    assert next(row for row in fake.rows("war_calls") if row["id"] == 1)["faction_id"] == A


@pytest.mark.e2e
async def test_heartbeats_are_answered_until_replies_stop(fake: FakeSupabase, dial: Dialer) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            ref = await client.push("phoenix", "heartbeat")
            assert await client.recv() == {
                "topic": "phoenix",
                "event": "phx_reply",
                "ref": ref,
                "payload": {"status": "ok", "response": {}},
            }
            fake.stop_heartbeat_replies()
            await client.push("phoenix", "heartbeat")
            unmatched_ref = await client.push("realtime:never-joined", "broadcast")
            unmatched = await client.recv()  # the heartbeat got no answer before it
            fake.resume_heartbeat_replies()
            resumed_ref = await client.push("phoenix", "heartbeat")
            resumed = await client.recv()
            assert fake.connections[0].heartbeats == 3
    assert (unmatched["ref"], unmatched["payload"]) == (
        unmatched_ref,
        {"status": "error", "response": {"reason": "unmatched topic"}},
    )
    assert resumed["ref"] == resumed_ref


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("query", "status", "body"),
    [
        ("vsn=1.0.0", 401, {"error": "API key is missing"}),
        ("apikey=wrong-key&vsn=1.0.0", 401, {"error": "Failed to validate JWT signature"}),
        (f"apikey={KEY}&vsn=3.0.0", 403, None),
    ],
)
async def test_upgrade_refusals(
    fake: FakeSupabase, dial: Dialer, query: str, status: int, body: dict[str, str] | None
) -> None:
    with trio.fail_after(5):
        refused = await dial.refusal(query)
    assert refused.status_code == status
    if body is None:
        assert not refused.body
    else:
        assert refused.body is not None
        assert json.loads(refused.body) == body
        assert (b"content-type", b"application/json") in refused.headers
    assert fake.upgrade_attempts == 1
    assert not fake.connections


@pytest.mark.e2e
async def test_header_key_and_runtime_key_changes(fake: FakeSupabase, dial: Dialer) -> None:
    with trio.fail_after(5):
        fake.valid_keys.add("rotated-key")
        # The header wins over the query parameter, as on the real server.
        async with dial.connect("apikey=wrong&vsn=1.0.0", headers=[(b"x-api-key", b"rotated-key")]):
            await fake.wait_until(lambda: len(fake.connections) == 1)
            assert fake.connections[0].apikey == "rotated-key"
        fake.valid_keys.clear()
        assert (await dial.refusal(f"apikey={KEY}")).status_code == 401


@pytest.mark.e2e
async def test_scripted_refusals_run_out_after_their_count(fake: FakeSupabase, dial: Dialer) -> None:
    fake.refuse_upgrades(429, "Too many connected users", count=1)
    with trio.fail_after(5):
        refused = await dial.refusal(f"apikey={KEY}")
        assert (refused.status_code, refused.body) == (429, b'{"error": "Too many connected users"}')
        fake.refuse_upgrades(503)
        unavailable = await dial.refusal(f"apikey={KEY}")
        assert (unavailable.status_code, unavailable.body) == (503, b"")
        assert (await dial.refusal(f"apikey={KEY}")).status_code == 503
        fake.accept_upgrades()
        async with dial.connect():
            await fake.wait_until(lambda: len(fake.connections) == 1)
    assert fake.upgrade_attempts == 4


@pytest.mark.e2e
async def test_join_failures_and_unmatched_topics(fake: FakeSupabase, dial: Dialer) -> None:
    reason = "RealtimeRestarting: Realtime is restarting, please standby"
    fake.fail_joins(reason, count=1)
    with trio.fail_after(5):
        async with dial.connect() as client:
            failed_ref = await client.join(TOPIC_A, binding(A))
            failed = await client.recv()
            await client.subscribe(TOPIC_A, binding(A))
            await client.join("not-realtime:x", binding(A))
            unmatched = await client.recv()
    assert (failed["ref"], failed["payload"]) == (
        failed_ref,
        {"status": "error", "response": {"reason": reason}},
    )
    assert unmatched["payload"]["response"] == {"reason": "unmatched topic"}


@pytest.mark.e2e
async def test_failed_subscriptions_send_a_system_error_after_the_ok_reply(
    fake: FakeSupabase, dial: Dialer
) -> None:
    fake.fail_subscriptions('{:error, "Too many database timeouts"}', count=1)
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.join(TOPIC_A, binding(A))
            ok, failed = await client.recv(), await client.recv()
            await client.join(
                TOPIC_B, {"event": "*", "schema": "public", "table": "war_calls", "filter": None}
            )
            null_ok, null_failed = await client.recv(), await client.recv()
            await client.subscribe("realtime:all-calls", binding(None))
            fake.insert("war_calls", call(A, 1))
            only = await client.recv()  # neither failed channel gets it
    assert (ok["payload"]["status"], null_ok["payload"]["status"]) == ("ok", "ok")
    assert failed["payload"] == {
        "channel": TOPIC_A.removeprefix("realtime:"),
        "extension": "postgres_changes",
        "status": "error",
        "message": '{:error, "Too many database timeouts"}',
    }
    assert null_failed["payload"]["message"].startswith("No subscription params provided")
    assert only["topic"] == "realtime:all-calls"


@pytest.mark.e2e
async def test_duplicate_join_closes_the_old_channel_after_the_new_reply(
    fake: FakeSupabase, dial: Dialer
) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            old_ref = client.join_refs[TOPIC_A]
            new_ref = await client.join(TOPIC_A, binding(A))
            frames = [await client.recv() for _ in range(3)]
            fake.insert("war_calls", call(A, 1))
            change = await client.recv()
    assert [(f["event"], f["ref"]) for f in frames] == [
        ("phx_reply", new_ref),
        ("phx_close", old_ref),
        ("system", None),
    ]
    assert change["payload"]["data"]["type"] == "INSERT"


@pytest.mark.e2e
async def test_leave_replies_then_closes(fake: FakeSupabase, dial: Dialer) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            leave_ref = await client.push(TOPIC_A, "phx_leave")
            reply, close = await client.recv(), await client.recv()
            assert fake.connections[0].joined_topics == []
            stray_ref = await client.push(TOPIC_B, "phx_leave")
            stray = await client.recv()
    assert (reply["event"], reply["ref"], reply["payload"]) == (
        "phx_reply",
        leave_ref,
        {"status": "ok", "response": {}},
    )
    assert close == {"topic": TOPIC_A, "event": "phx_close", "ref": client.join_refs[TOPIC_A], "payload": {}}
    assert (stray["ref"], stray["payload"]["status"]) == (stray_ref, "ok")


@pytest.mark.e2e
async def test_shutdown_channel_and_system_disconnect(fake: FakeSupabase, dial: Dialer) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            await client.subscribe(TOPIC_B, binding(B))
            fake.shutdown_channel(TOPIC_A, "Node request timeout")
            shutdown, close = await client.recv(), await client.recv()
            fake.send_system_disconnect()
            disconnect = await client.recv()
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
    assert shutdown["payload"] == {
        "channel": TOPIC_A.removeprefix("realtime:"),
        "extension": "system",
        "status": "error",
        "message": "Node request timeout",
    }
    assert (close["event"], close["ref"]) == ("phx_close", client.join_refs[TOPIC_A])
    assert (disconnect["topic"], disconnect["payload"]) == (
        TOPIC_B,
        {"extension": "system", "status": "ok", "message": "Server requested disconnect"},
    )
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1012


@pytest.mark.e2e
@pytest.mark.parametrize(("code", "seen"), [(None, 1006), (1012, 1012), (1000, 1000)])
async def test_drop_connections(fake: FakeSupabase, dial: Dialer, code: int | None, seen: int) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            await fake.wait_until(lambda: len(fake.connections) == 1)
            fake.drop_connections(code)
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert not fake.connections
    assert closed.value.reason is not None
    assert closed.value.reason.code == seen


@pytest.mark.e2e
async def test_raw_frames_out_and_malformed_frames_in(fake: FakeSupabase, dial: Dialer) -> None:
    with trio.fail_after(5):
        async with dial.connect() as client:
            await fake.wait_until(lambda: len(fake.connections) == 1)
            fake.send_raw("{not json")
            assert await client.ws.get_message() == "{not json"
            junk: list[str | bytes] = [
                "nope",
                "[1, 2]",
                '{"topic": "phoenix", "event": "heartbeat"}',
                b"\x00",
            ]
            for message in junk:
                await client.ws.send_message(message)
            ref = await client.push("phoenix", "heartbeat")
            assert (await client.recv())["ref"] == ref
            assert fake.connections[0].heartbeats == 1


@pytest.mark.virtual_time
async def test_idle_socket_is_closed_with_1000(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.idle_timeout_s = 2.0
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.push("phoenix", "heartbeat")
            await client.recv()
            started = trio.current_time()
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1000


@pytest.mark.virtual_time
async def test_frozen_server_neither_reads_nor_writes(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.idle_timeout_s = 1.0
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            fake.freeze()
            await client.push("phoenix", "heartbeat")
            fake.insert("war_calls", call(A, 1))
            with trio.move_on_after(3) as waited:  # far beyond the idle timeout: still open, silent
                await client.recv()
            assert waited.cancelled_caught
            assert len(fake.connections) == 1
            fake.drop_connections(None)
            await fake.wait_until(lambda: not fake.connections)


@pytest.mark.virtual_time
async def test_a_frozen_server_answers_a_close_unless_told_not_to(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        for answer_close in (True, False):
            async with dial.connect() as client:
                await client.subscribe(TOPIC_A, binding(A))
                fake.freeze(answer_close=answer_close)
                with trio.move_on_after(30) as waited:
                    await client.ws.aclose()
                assert waited.cancelled_caught is not answer_close
            fake.drop_connections(None)
            await fake.wait_until(lambda: not fake.connections)


@pytest.mark.virtual_time
async def test_delays_in_virtual_time(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.subscribe_delay_s, fake.join_error_delay_s = 3.0, 5.0
    fake.fail_joins("ClientJoinRateLimitReached: Too many joins per second", count=1)
    with trio.fail_after(20):
        async with dial.connect() as client:
            start = trio.current_time()
            await client.join(TOPIC_A, binding(A))
            assert (await client.recv())["payload"]["status"] == "error"
            assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001  # this join error disconnects the whole socket
        async with dial.connect() as client:
            await client.join(TOPIC_A, binding(A))
            await client.recv()
            start = trio.current_time()
            fake.insert("war_calls", call(A, 1))  # before "Subscribed": lost, as on the real server
            assert (await client.recv())["payload"]["message"] == "Subscribed to PostgreSQL"
            assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
            fake.insert("war_calls", call(A, 2))
            assert (await client.recv())["payload"]["data"]["record"]["id"] == 2
            fake.frame_delay_s = 0.5
            start = trio.current_time()
            await client.push("phoenix", "heartbeat")
            await client.recv()
            assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)


@pytest.mark.virtual_time
async def test_war_traffic_makes_every_kind_of_change(
    fake: FakeSupabase, dial: Dialer, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    seen: set[tuple[str, str]] = set()
    with trio.fail_after(5):
        async with dial.connect() as client:
            await client.subscribe("realtime:calls", binding(None))
            await client.subscribe("realtime:chat", binding(None, "faction_messages"))
            traffic = functools.partial(
                generate_war_traffic, fake, [A, B], changes_per_s=50.0, rng=random.Random(7)
            )
            nursery.start_soon(traffic)
            while len(seen) < 4:
                data = (await client.recv())["payload"]["data"]
                seen.add((data["table"], data["type"]))
    assert ("faction_messages", "INSERT") in seen
    calls = fake.rows("war_calls")
    assert {row["faction_id"] for row in calls} <= {A, B}
    assert all(set(row) == set(WAR_CALLS_COLUMNS) for row in calls)


# --- the real server over time (issue 17): each behaviour a switch ---


@pytest.mark.virtual_time
async def test_a_cold_start_says_subscribed_before_capture_and_loses_that_window(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.cold_start(5.0)
    with trio.fail_after(30):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))  # "Subscribed" at once
            fake.insert("war_calls", call(A, 1))  # committed before the slot exists: never sent
            await trio.sleep(5.0)
            fake.insert("war_calls", call(A, 2))
            change = await client.recv()
    assert change["payload"]["data"]["record"]["id"] == 2


@pytest.mark.virtual_time
async def test_a_resubscribe_loses_the_gap_and_says_subscribed_again(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        async with dial.connect() as client:
            await client.subscribe(TOPIC_A, binding(A))
            fake.resubscribe(gap_s=2.0)
            fake.insert("war_calls", call(A, 1))  # in the gap: its subscription is deleted
            again = await client.recv()
            fake.insert("war_calls", call(A, 2))
            change = await client.recv()
            fake.resubscribe(error='{:error, "Too many database timeouts"}')
            failed = await client.recv()
    assert again["event"] == "system"
    assert again["payload"]["message"] == "Subscribed to PostgreSQL"
    assert change["payload"]["data"]["record"]["id"] == 2
    assert (failed["payload"]["status"], failed["payload"]["message"]) == (
        "error",
        '{:error, "Too many database timeouts"}',
    )


@pytest.mark.virtual_time
async def test_a_transient_subscription_error_is_retried_on_the_same_join_in_5_to_10_s(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.retry_subscriptions = True
    fake.fail_subscriptions('{:error, "Too many database timeouts"}', count=2)
    with trio.fail_after(60):
        async with dial.connect() as client:
            await client.join(TOPIC_A, binding(A))
            assert (await client.recv())["payload"]["status"] == "ok"
            messages = []
            for _ in range(3):
                frame = await client.recv()
                messages.append(
                    (trio.current_time(), frame["payload"]["status"], frame["payload"]["message"])
                )
    (first_at, *_), (second_at, *_), (third_at, *_) = messages
    assert [status for _, status, _ in messages] == ["error", "error", "ok"]
    assert messages[2][2] == "Subscribed to PostgreSQL"
    assert 5.0 <= second_at - first_at <= 10.0
    assert 5.0 <= third_at - second_at <= 10.0


@pytest.mark.virtual_time
async def test_a_final_subscription_error_is_not_retried(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.retry_subscriptions = True
    message = 'Error parsing `filter` params: ["equals", "5"]'
    fake.fail_subscriptions(message, count=1)
    with trio.fail_after(60):
        async with dial.connect() as client:
            await client.join(TOPIC_A, binding(A))
            await client.recv()
            failed = await client.recv()
            joins = fake.joins
            with trio.move_on_after(30):  # three retries' worth: nothing comes, not even a heartbeat reply
                await client.recv()
                raise AssertionError("a final error was followed by something")
    assert failed["payload"]["message"] == message
    assert fake.joins == joins


@pytest.mark.virtual_time
async def test_without_action_filtering_a_binding_gets_every_type(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    fake.filter_by_action = False
    deletes = {"event": "DELETE", "schema": "public", "table": "war_calls"}
    with trio.fail_after(30):
        async with dial.connect() as client:
            await client.subscribe("realtime:deletes", deletes)
            fake.insert("war_calls", call(A, 1))
            fake.update("war_calls", 1, {"caller_name": "bob"})
            fake.delete("war_calls", 1)
            types = [(await client.recv())["payload"]["data"]["type"] for _ in range(3)]
    assert types == ["INSERT", "UPDATE", "DELETE"]


@pytest.mark.virtual_time
async def test_a_slow_join_holds_every_frame_behind_it_the_heartbeat_reply_too(
    fake: FakeSupabase, dial: Dialer, autojump_clock: trio.abc.Clock
) -> None:
    """Phoenix's socket process answers a join before it reads the next frame or writes what its
    channels pushed meanwhile: the heartbeat reply and a joined channel's change wait behind it."""
    with trio.fail_after(60):
        async with dial.connect() as client:
            await client.subscribe("realtime:calls", binding(A))
            fake.join_delay_s = 15.0
            started = trio.current_time()
            await client.join(TOPIC_A, binding(A))
            await client.join(TOPIC_B, binding(B))
            heartbeat = await client.push("phoenix", "heartbeat")
            await trio.sleep(1.0)
            fake.insert("war_calls", call(A, 1))  # pushed on the joined channel during the first join
            frames: list[tuple[float, str, str]] = []
            while len(frames) < 6:
                frame = await client.recv()
                frames.append((round(trio.current_time() - started, 1), frame["topic"], frame["event"]))
                if frame["topic"] == "phoenix":
                    assert frame["ref"] == heartbeat
    assert [(at, topic, event) for at, topic, event in frames if topic != TOPIC_A or event != "system"] == [
        (15.0, TOPIC_A, "phx_reply"),
        (15.0, "realtime:calls", "postgres_changes"),  # held while the join was answered
        (30.0, TOPIC_B, "phx_reply"),
        (30.0, TOPIC_B, "system"),
        (30.0, "phoenix", "phx_reply"),  # read only after both joins
    ]
