"""The sans-IO protocol core on strings alone: frames out, frames in, every rule of the reference."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.upstream.phoenix import (
    AllChannelsLive,
    BindingMismatch,
    ChangeIgnored,
    ChangeReceived,
    ChannelClosedByServer,
    ChannelSpec,
    ConnectionLost,
    HandshakeRefused,
    HeartbeatAcknowledged,
    JoinRefused,
    MalformedFrame,
    Resubscribed,
    Session,
    SubscriptionMisconfigured,
    SubscriptionRetrying,
    filter_mismatch,
    socket_url,
    to_realtime_js,
)

pytestmark = pytest.mark.unit

WAR_CALLS = ChannelSpec("war_calls", "faction_id=eq.46666")
MESSAGES = ChannelSpec("faction_messages", "faction_id=eq.46666")


def frame(topic: str, event: str, payload: dict[str, Any], ref: str | None = None) -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})


def join_reply(spec: ChannelSpec, ref: str, binding_id: int = 38217443, **override: Any) -> str:
    entry = {**spec.binding(), "id": binding_id, **override}
    return frame(spec.topic, "phx_reply", {"status": "ok", "response": {"postgres_changes": [entry]}}, ref)


def subscribed(spec: ChannelSpec) -> str:
    payload = {
        "channel": spec.topic.removeprefix("realtime:"),
        "extension": "postgres_changes",
        "status": "ok",
        "message": "Subscribed to PostgreSQL",
    }
    return frame(spec.topic, "system", payload)


def change(spec: ChannelSpec, change_type: str, *, ids: list[int] | None = None, **data: Any) -> str:
    body: dict[str, Any] = {
        "schema": "public",
        "table": spec.table,
        "commit_timestamp": "2026-11-24T15:00:00.123Z",
    }
    body.update({"type": change_type, "columns": [], "errors": None})
    body.update(data)
    return frame(spec.topic, "postgres_changes", {"ids": ids or [38217443], "data": body})


def joined_session(*specs: ChannelSpec) -> tuple[Session, list[dict[str, Any]]]:
    session = Session(specs or (WAR_CALLS,), "anon")
    joins = [json.loads(text) for text in session.join_frames()]
    for spec, join in zip(session.specs, joins, strict=True):
        session.receive(join_reply(spec, join["ref"]))
        session.receive(subscribed(spec))
    return session, joins


def test_socket_url_adds_key_and_vsn_and_keeps_other_query() -> None:
    url = socket_url("wss://ref.supabase.co/realtime/v1/websocket?log_level=info&vsn=2.0.0", "k y")
    assert url == "wss://ref.supabase.co/realtime/v1/websocket?log_level=info&apikey=k+y&vsn=1.0.0"


def test_join_frames_carry_config_join_ref_and_never_a_null_filter() -> None:
    session = Session([WAR_CALLS, ChannelSpec("wars", "")], "anon")
    first, second = (json.loads(text) for text in session.join_frames())
    assert first["topic"] == "realtime:public:war_calls:faction_id=eq.46666"
    assert first["event"] == "phx_join"
    assert first["ref"] == first["join_ref"] == "1"
    assert first["payload"]["config"]["postgres_changes"] == [
        {"event": "*", "schema": "public", "table": "war_calls", "filter": "faction_id=eq.46666"}
    ]
    assert first["payload"]["access_token"] == "anon"
    assert second["ref"] == "2"
    assert second["payload"]["config"]["postgres_changes"] == [
        {"event": "*", "schema": "public", "table": "wars"}
    ]


def test_live_only_after_every_channel_is_subscribed_to_postgres() -> None:
    session = Session([WAR_CALLS, MESSAGES], "anon")
    war_join, message_join = (json.loads(text) for text in session.join_frames())
    assert session.receive(join_reply(WAR_CALLS, war_join["ref"])) == []
    assert session.receive(join_reply(MESSAGES, message_join["ref"], binding_id=7)) == []
    assert session.receive(subscribed(WAR_CALLS)) == []
    assert not session.live
    assert session.receive(subscribed(MESSAGES)) == [AllChannelsLive()]
    assert session.live


def test_subscribed_before_the_join_reply_does_not_count() -> None:
    session = Session([WAR_CALLS], "anon")
    join = json.loads(session.join_frames()[0])
    assert session.receive(subscribed(WAR_CALLS)) == []
    session.receive(join_reply(WAR_CALLS, join["ref"]))
    assert not session.live


def test_heartbeat_reply_is_matched_by_ref() -> None:
    session, _ = joined_session()
    heartbeat = json.loads(session.heartbeat_frame())
    assert heartbeat == {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": heartbeat["ref"]}
    assert session.heartbeat_pending
    stale = frame("phoenix", "phx_reply", {"status": "ok", "response": {}}, "999")
    assert session.receive(stale) == []
    assert session.heartbeat_pending
    reply = frame("phoenix", "phx_reply", {"status": "ok", "response": {}}, heartbeat["ref"])
    assert session.receive(reply) == [HeartbeatAcknowledged()]
    assert not session.heartbeat_pending


def test_insert_update_delete_become_the_realtime_js_shape() -> None:
    session, _ = joined_session()
    row = {"id": 7, "faction_id": 46666, "target_id": 999, "caller_name": "alice"}
    (inserted,) = session.receive(change(WAR_CALLS, "INSERT", record=row))
    assert inserted == ChangeReceived(
        "war_calls",
        {
            "schema": "public",
            "table": "war_calls",
            "commit_timestamp": "2026-11-24T15:00:00.123Z",
            "eventType": "INSERT",
            "new": row,
            "old": {},
            "errors": None,
        },
    )
    (updated,) = session.receive(change(WAR_CALLS, "UPDATE", record=row, old_record={"id": 7}))
    assert isinstance(updated, ChangeReceived)
    assert (updated.data["new"], updated.data["old"]) == (row, {"id": 7})
    (deleted,) = session.receive(change(WAR_CALLS, "DELETE", old_record=row))
    assert isinstance(deleted, ChangeReceived)
    assert (deleted.data["eventType"], deleted.data["new"], deleted.data["old"]) == ("DELETE", {}, row)


def test_another_factions_delete_is_ignored_but_a_key_only_delete_passes() -> None:
    session, _ = joined_session()
    (foreign,) = session.receive(change(WAR_CALLS, "DELETE", old_record={"id": 1, "faction_id": 11581}))
    assert isinstance(foreign, ChangeIgnored)
    (key_only,) = session.receive(change(WAR_CALLS, "DELETE", old_record={"id": 1}))
    assert isinstance(key_only, ChangeReceived)


def test_changes_for_another_binding_id_are_ignored() -> None:
    session, _ = joined_session()
    (outcome,) = session.receive(change(WAR_CALLS, "INSERT", ids=[1], record={"id": 1, "faction_id": 46666}))
    assert isinstance(outcome, ChangeIgnored)


def test_null_commit_timestamp_and_error_rows_do_not_crash() -> None:
    session, _ = joined_session()
    text = change(WAR_CALLS, "INSERT", record={}, commit_timestamp=None, errors=["Error 401: Unauthorized"])
    (outcome,) = session.receive(text)
    assert isinstance(outcome, ChangeReceived)
    assert outcome.data["commit_timestamp"] is None
    assert outcome.data["errors"] == ["Error 401: Unauthorized"]


@pytest.mark.parametrize(
    ("reason", "auth", "retry_after"),
    [
        ("JwtSignatureError: bad signature", True, None),
        ("ClientJoinRateLimitReached: Too many joins per second", False, 30.0),
        ("RealtimeRestarting: Realtime is restarting, please standby", False, None),
    ],
)
def test_join_error_is_refused_with_its_reason(reason: str, auth: bool, retry_after: float | None) -> None:
    session = Session([WAR_CALLS], "anon")
    join = json.loads(session.join_frames()[0])
    reply = frame(
        WAR_CALLS.topic, "phx_reply", {"status": "error", "response": {"reason": reason}}, join["ref"]
    )
    with pytest.raises(JoinRefused, match=reason.split(":")[0]) as caught:
        session.receive(reply)
    assert caught.value.auth is auth
    assert caught.value.retry_after_s == retry_after


def test_join_reply_that_does_not_echo_our_binding_is_refused() -> None:
    session = Session([WAR_CALLS], "anon")
    join = json.loads(session.join_frames()[0])
    with pytest.raises(BindingMismatch):
        session.receive(join_reply(WAR_CALLS, join["ref"], filter="faction_id=eq.1"))


def postgres_changes_error(spec: ChannelSpec, message: str) -> str:
    payload = {
        "channel": spec.topic.removeprefix("realtime:"),
        "extension": "postgres_changes",
        "status": "error",
        "message": message,
    }
    return frame(spec.topic, "system", payload)


@pytest.mark.parametrize(
    "message",
    [
        'Error parsing `filter` params: ["equals", "5"]',
        "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: %{}",
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the"
        " given connect parameters: [event: *, schema: public, table: war_calls, filters: []]",
        "Unable to subscribe to changes with given parameters. An exception happened so please check your"
        " connect parameters: [schema: public, table: war_calls, filters: [...]]. Exception: ERROR 42703",
    ],
)
def test_an_error_the_server_never_retries_is_a_misconfiguration(message: str) -> None:
    session = Session([WAR_CALLS], "anon")
    join = json.loads(session.join_frames()[0])
    session.receive(join_reply(WAR_CALLS, join["ref"]))
    with pytest.raises(SubscriptionMisconfigured) as caught:
        session.receive(postgres_changes_error(WAR_CALLS, message))
    assert caught.value.misconfigured
    assert caught.value.detail == message  # the server's own words, for /status


def test_a_transient_error_keeps_the_join_and_the_servers_retry_makes_it_live() -> None:
    session = Session([WAR_CALLS, MESSAGES], "anon")
    war_join, message_join = (json.loads(text) for text in session.join_frames())
    session.receive(join_reply(WAR_CALLS, war_join["ref"]))
    session.receive(join_reply(MESSAGES, message_join["ref"], binding_id=7))
    timeouts = '{:error, "Too many database timeouts"}'
    assert session.receive(postgres_changes_error(WAR_CALLS, timeouts)) == [
        SubscriptionRetrying("war_calls", timeouts)
    ]
    assert session.receive(subscribed(MESSAGES)) == []
    assert not session.live
    assert session.retrying == timeouts
    assert session.receive(subscribed(WAR_CALLS)) == [AllChannelsLive()]  # the retry, 5-10 s later
    assert session.live
    assert session.retrying is None


def test_a_second_subscribed_is_a_resubscription_and_an_error_meanwhile_is_not_live() -> None:
    session, _ = joined_session(WAR_CALLS, MESSAGES)
    assert session.receive(subscribed(WAR_CALLS)) == [Resubscribed("war_calls")]
    assert session.live
    timeouts = '{:error, "Too many database timeouts"}'
    assert session.receive(postgres_changes_error(MESSAGES, timeouts)) == [
        SubscriptionRetrying("faction_messages", timeouts)
    ]
    assert not session.live
    assert session.receive(subscribed(MESSAGES)) == [Resubscribed("faction_messages")]
    assert session.live


def test_joins_outstanding_counts_the_unanswered_joins() -> None:
    session = Session([WAR_CALLS, MESSAGES], "anon")
    war_join, message_join = (json.loads(text) for text in session.join_frames())
    assert session.joins_outstanding == 2
    session.receive(join_reply(WAR_CALLS, war_join["ref"]))
    assert session.joins_outstanding == 1
    session.receive(join_reply(MESSAGES, message_join["ref"], binding_id=7))
    assert session.joins_outstanding == 0


def test_a_change_of_another_type_than_the_bindings_event_is_ignored() -> None:
    """Servers before the 2025-11 migrations send every type to a DELETE binding; realtime-js drops them."""
    deletes = ChannelSpec("war_calls", "", event="DELETE")
    session, _ = joined_session(deletes)
    row = {"id": 1, "faction_id": 46666}
    (inserted,) = session.receive(change(deletes, "INSERT", record=row))
    assert inserted == ChangeIgnored("war_calls", "INSERT on a DELETE binding")
    (updated,) = session.receive(change(deletes, "UPDATE", record=row, old_record={"id": 1}))
    assert isinstance(updated, ChangeIgnored)
    (deleted,) = session.receive(change(deletes, "DELETE", old_record={"id": 1}))
    assert isinstance(deleted, ChangeReceived)
    # A binding on every type takes them all.
    everything, _ = joined_session(WAR_CALLS)
    (taken,) = everything.receive(change(WAR_CALLS, "UPDATE", record=row, old_record={"id": 1}))
    assert isinstance(taken, ChangeReceived)


def test_channel_shutdown_message_ends_the_connection() -> None:
    session, _ = joined_session()
    shutdown = {
        "channel": "x",
        "extension": "system",
        "status": "error",
        "message": "Too many messages per second",
    }
    with pytest.raises(ChannelClosedByServer, match="Too many messages"):
        session.receive(frame(WAR_CALLS.topic, "system", shutdown))


def test_phx_close_for_an_old_join_is_ignored_and_for_the_current_one_ends() -> None:
    session, joins = joined_session()
    assert session.receive(frame(WAR_CALLS.topic, "phx_close", {}, "0")) == []
    with pytest.raises(ChannelClosedByServer):
        session.receive(frame(WAR_CALLS.topic, "phx_close", {}, joins[0]["ref"]))


def test_phx_error_for_the_current_join_ends() -> None:
    session, joins = joined_session()
    with pytest.raises(ChannelClosedByServer):
        session.receive(frame(WAR_CALLS.topic, "phx_error", {}, joins[0]["ref"]))


def test_presence_and_other_topics_are_ignored() -> None:
    session, _ = joined_session()
    assert session.receive(frame(WAR_CALLS.topic, "presence_state", {})) == []
    assert session.receive(frame("realtime:other", "postgres_changes", {"data": {}})) == []
    disconnect = {"extension": "system", "status": "ok", "message": "Server requested disconnect"}
    assert session.receive(frame(WAR_CALLS.topic, "system", disconnect)) == []


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1,2,3]",
        '{"topic": "t"}',
        '{"topic": 1, "event": "x", "payload": {}}',
        '{"topic": "t", "event": "x", "payload": []}',
        b"\xff\xfe",
        # Nested past what the parser takes: it raised RecursionError, logged as a bug with a traceback.
        '{"topic": "t", "event": "x", "payload": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}",
    ],
)
def test_malformed_frames_are_refused(text: str | bytes) -> None:
    session, _ = joined_session()
    with pytest.raises(MalformedFrame):
        session.receive(text)


def test_change_with_unknown_type_or_no_data_is_malformed() -> None:
    session, _ = joined_session()
    with pytest.raises(MalformedFrame):
        session.receive(change(WAR_CALLS, "TRUNCATE"))
    with pytest.raises(MalformedFrame):
        session.receive(frame(WAR_CALLS.topic, "postgres_changes", {"ids": [38217443]}))


def test_to_realtime_js_ignores_keys_that_do_not_belong_to_the_type() -> None:
    shaped = to_realtime_js({"type": "INSERT", "record": {"id": 1}, "old_record": {"id": 0}})
    assert (shaped["new"], shaped["old"]) == ({"id": 1}, {})


@pytest.mark.parametrize(
    ("filter_text", "row", "passes"),
    [
        ("faction_id=eq.46666", {"faction_id": 46666}, True),
        ("faction_id=eq.46666", {"faction_id": "46666"}, True),
        ("faction_id=eq.46666", {"faction_id": 1}, False),
        ("faction_id=eq.46666", {"id": 3}, True),
        ("faction_id=eq.46666", {"faction_id": None}, False),
        ("active=eq.true", {"active": True}, True),
        ("faction_id=eq.46666,war_id=eq.2", {"faction_id": 46666, "war_id": 3}, False),
        ('name=eq."a,b",faction_id=eq.1', {"name": "a,b", "faction_id": 1}, True),
        ("faction_id=in.(1,2)", {"faction_id": 5}, True),
        ("", {"faction_id": 5}, True),
    ],
)
def test_filter_check(filter_text: str, row: dict[str, Any], passes: bool) -> None:
    assert (filter_mismatch(filter_text, row) is None) is passes


def test_error_messages_name_the_cause() -> None:
    assert "401" in str(HandshakeRefused(401, "Failed to validate JWT signature"))
    assert HandshakeRefused(401, None).auth
    assert not HandshakeRefused(503, None).auth
    assert HandshakeRefused(429, None).retry_after_s == 30.0
    assert "1012" in str(ConnectionLost(1012))
    assert "without a close frame" in str(ConnectionLost(1006))
