"""A scriptable fake Supabase Realtime server (vsn 1.0.0 framing) on real loopback sockets.

It is written from `shared/reference/supabase-realtime-protocol.md` (section numbers below point
there) and never imports the relay's own protocol code, so a misreading of the protocol in the relay
shows up as a failing test instead of being shared by both sides. Known simplifications: legacy joins
(no `config`) are answered but never get changes; vsn 2.0.0 upgrades are accepted as the real server
does, then closed (1011) because only 1.0.0 framing is spoken; `select`, `not.`, comma-ANDed filters
and RLS are not modelled; rows are stored as given, so a column a test leaves out is absent, not null.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream
from wsproto.events import Message
from wsproto.utilities import LocalProtocolError

from relay.testing.fake_rest import (
    ReplayStream,
    RestRequest,
    answer,
    http_response,
    parse_head,
    read_head,
    request_faction,
)
from relay.testing.fake_tables import (
    FACTION_MESSAGES_COLUMNS,
    MAX_RECORD_BYTES,
    WAR_CALLS_COLUMNS,
    WARS_COLUMNS,
    Binding,
    ChangeType,
    ReplicaIdentity,
    Row,
    SubscriptionError,
    Table,
    binding_id,
    parse_binding,
)

logger = logging.getLogger(__name__)

# The hosted gateway's path, and a self-hosted server's own Phoenix socket path (1.1).
WEBSOCKET_PATHS = ("/realtime/v1/websocket", "/socket/websocket")
DEFAULT_IDLE_TIMEOUT_S = 60.0  # Phoenix's websocket `timeout: 60_000`, which Realtime keeps (8)
# Bounds for our own waits, so a client that never finishes a handshake cannot pin a task forever.
HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_HANDSHAKE_TIMEOUT_S = 5.0
RECEIVED_FRAMES_KEPT = 256  # enough for assertions, bounded for a long `relay demo`
DISCONNECTING_JOIN_ERRORS = ("ClientJoinRateLimitReached", "TenantNotFound")
SUBSCRIBED = "Subscribed to PostgreSQL"
# `postgres_changes` errors the server does not retry: `realtime_channel.ex` handle_info(:postgres_subscribe)
# gives up only on `:malformed_subscription_params` and `:subscription_insert_failed` ("No point in
# retrying if the params are invalid"), and these are the messages those reasons carry (reference 5.2).
FINAL_SUBSCRIPTION_ERRORS = (
    "Unable to subscribe to changes with given parameters",
    "Error parsing `filter` params",
    "No subscription params provided",
)
# Every other error is pushed as `inspect(error)` and retried on the same join by
# `postgres_subscribe(5, 10)`: a uniform 5-10 s wait (`realtime_channel.ex`, `backoff/2`).
SUBSCRIPTION_RETRY_S = (5.0, 10.0)
# A paced flood writes what is due every slice: short enough that the changes reach the socket as a
# stream rather than in bursts, long enough that trio's scheduling is not most of the work.
FLOOD_SLICE_S = 0.01
# Frames written at once when more are queued: 64 change frames are ~50 KiB, one socket write.
WRITE_BATCH_FRAMES = 64
T = TypeVar("T")


# --- frames (2.1): exactly topic, event, payload, ref; ref null on pushes; never join_ref -------------


def _frame(topic: str, event: str, payload: Mapping[str, Any], ref: Any = None) -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})


def _reply(topic: str, ref: Any, status: str, response: Mapping[str, Any]) -> str:
    return _frame(topic, "phx_reply", {"status": status, "response": response}, ref)


def _system(topic: str, *, extension: str, status: str, message: str) -> str:
    payload = {"channel": topic.removeprefix("realtime:"), "extension": extension, "status": status}
    return _frame(topic, "system", {**payload, "message": message})


@dataclass(frozen=True)
class _Inbound:
    topic: str
    event: str
    payload: dict[str, Any]
    ref: Any
    raw: dict[str, Any]


def _parse_inbound(message: str | bytes) -> _Inbound | None:
    """A client frame, or None for what the real server logs and drops (2.1)."""
    if isinstance(message, bytes):
        return None
    try:
        decoded = json.loads(message)
    except ValueError:
        return None
    if not isinstance(decoded, dict) or not {"topic", "event", "payload", "ref"} <= decoded.keys():
        return None
    topic, event, payload = decoded["topic"], decoded["event"], decoded["payload"]
    if not (isinstance(topic, str) and isinstance(event, str) and isinstance(payload, dict)):
        return None
    return _Inbound(topic, event, payload, decoded["ref"], decoded)


# --- one socket ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Channel:
    topic: str
    join_ref: Any  # the client's join_ref; null when it sent none, and phx_close then says null (9)
    bindings: list[Binding]
    live: bool = False  # only after "Subscribed to PostgreSQL": earlier changes are lost (5.1)
    wanted: list[Binding] | None = None  # what the channel subscribes (again) to, once parsed


@dataclass(frozen=True)
class _Subscription:
    """What a channel's process does after an ok join reply: subscribe, or report why not (5.1, 5.2)."""

    channel: _Channel
    bindings: list[Binding]
    error: str | None


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


@dataclass(frozen=True)
class _Abort:
    """End with no close frame: the client sees 1006."""


@dataclass(frozen=True)
class _PeerGone:
    """The client closed, or the socket broke under us."""


_Ending: TypeAlias = _Close | _Abort | _PeerGone
_Outgoing: TypeAlias = str | _Close


class _HangableStream(trio.abc.Stream):
    """The socket as trio-websocket sees it. Once hung, nothing more is read from it or written to it,
    so not even a close frame or a ping is answered, though the TCP connection stays open."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.hung = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.hung:
            data = bytes(await self._stream.receive_some(max_bytes))
            if not self.hung:  # what a read in progress brings after the hang is never seen
                return data
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.hung:
            await trio.sleep_forever()
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class FakeConnection:
    """One accepted socket as a test sees it; `FakeSupabase` does the protocol work on it."""

    def __init__(
        self, ws: WebSocketConnection, stream: trio.SocketStream, *, apikey: str, wire: _HangableStream
    ) -> None:
        self.apikey = apikey
        self.heartbeats = 0
        self.received: deque[dict[str, Any]] = deque(maxlen=RECEIVED_FRAMES_KEPT)
        self.frozen = False
        # Per socket, so that a test can fault one faction's socket while another's keeps working.
        self.heartbeat_replies = True
        self.frame_delay_s = 0.0
        self._ws = ws
        self._stream = stream
        self._wire = wire
        self._channels: dict[str, _Channel] = {}
        # Unbounded so that the scripting methods and mutations can stay synchronous.
        self._outbox, self._outbox_receive = trio.open_memory_channel[_Outgoing](math.inf)
        self._ending: _Ending | None = None
        self._ended = trio.Event()
        self._io_scope = trio.CancelScope()
        self._last_received = trio.current_time()
        # While a join is being answered (`join_delay_s`) the socket process is blocked in it: what its
        # channels push meanwhile waits in its mailbox and is written after the join's reply.
        self._held: list[_Outgoing] | None = None

    @property
    def joined_topics(self) -> list[str]:
        return list(self._channels)

    def _send(self, item: _Outgoing) -> None:
        if self._held is not None:
            self._held.append(item)
            return
        self._outbox.send_nowait(item)

    def __repr__(self) -> str:
        return f"<FakeConnection {id(self):#x} topics={self.joined_topics} heartbeats={self.heartbeats}>"


@dataclass
class _Fault(Generic[T]):
    value: T
    remaining: int | None  # None: until cleared


def _take(fault: _Fault[T] | None) -> tuple[T | None, _Fault[T] | None]:
    """This occurrence's value, and what is left of the fault afterwards."""
    if fault is None:
        return None, None
    if fault.remaining is None:
        return fault.value, fault
    left = fault.remaining - 1
    return fault.value, (_Fault(fault.value, left) if left > 0 else None)


def _fault(value: T, count: int | None) -> _Fault[T]:
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1 or None, not {count}")
    return _Fault(value, count)


def _vsn_supported(vsn: str) -> bool:
    # Phoenix matches `~> 1.0.0` and `~> 2.0.0`; an unparsable version is refused too (1.3).
    parts = vsn.split(".")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return False
    return int(parts[0]) in (1, 2) and int(parts[1]) == 0


@dataclass(frozen=True)
class _Refusal:
    status: int
    error: str | None
    delayed: bool


# --- the server ------------------------------------------------------------------------------------


class FakeSupabase:
    """Serve the Realtime socket on `url` until cancelled; script faults and table changes from a test.

    Plain attributes are knobs read at the moment they apply, so a test may change them at any time.
    """

    def __init__(
        self, *, valid_keys: Iterable[str] = ("anon-key",), host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if isinstance(valid_keys, str):
            raise TypeError("valid_keys is a collection of keys, not one key")
        self.valid_keys: set[str] = set(valid_keys)
        self.refusal_delay_s = 0.0  # the real server waits 2 s before each refusal (1.3)
        self.subscribe_delay_s = 0.0
        self.join_error_delay_s = 0.0  # the real server waits 5 s before each join error (4.2)
        self.frame_delay_s = 0.0
        self.idle_timeout_s = DEFAULT_IDLE_TIMEOUT_S
        self.deliver_deletes_unfiltered = False  # the 2022-09..2024-08 servers (7)
        self.ignore_filters = False  # lets a test check the relay's own filter check
        # Servers before the 2025-11 tenant migrations `20251120212548_add_action_to_subscriptions` and
        # `20251120215549_filter_action_postgres_changes` never filtered by action: `apply_rls` sent
        # every change type to a binding whatever its `event` (audit finding 7). False: such a server.
        self.filter_by_action = True
        # Phoenix's socket process answers phx_join synchronously (supabase/phoenix `channel/server.ex`
        # `join/4` waits in `receive`), and a Realtime join can take 15-24 s on a cold project (audit
        # finding 8): every join is answered only after this, and every frame the client sent behind it
        # (a heartbeat too) waits, in order.
        self.join_delay_s = 0.0
        # A transient `postgres_changes` error retried on the same join, as the real server does
        # (5-10 s later, then "Subscribed" or another error). False: the error is sent and nothing follows.
        self.retry_subscriptions = False
        self.rng = random.Random(0)
        self.upgrade_attempts = 0
        self.joins = 0
        # PostgREST on the same port (fake_rest): every request seen (newest kept), and a hold that, while
        # set to an unset Event, keeps each answer (its rows already read) until the Event is set.
        self.rest_requests: deque[RestRequest] = deque(maxlen=RECEIVED_FRAMES_KEPT)
        self.rest_request_count = 0
        self.rest_hold: trio.Event | None = None
        # PostgREST's db-max-rows (Supabase sets 1,000; operators lower it): a read's rows are cut to it.
        self.rest_max_rows: int | None = None
        self.rest_drop_content_range = False  # as a proxy that strips it: no total ever known
        # What REST cost, per faction read (`faction_id=eq.N`; None for a read across factions).
        self.rest_bytes: Counter[int | None] = Counter()  # response bytes, head included
        self.rest_requests_by_faction: Counter[int | None] = Counter()
        self._rest_failure: _Fault[int] | None = None
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._connections: list[FakeConnection] = []
        self._tables: dict[str, Table] = {}
        self._heartbeat_replies = True
        self._refusal: _Fault[tuple[int, str | None]] | None = None
        self._join_failure: _Fault[str] | None = None
        self._subscription_failure: _Fault[str] | None = None
        self._changed = trio.Event()
        self._capture_running = True  # see stop_capture
        self.capture_restarts = 0
        # Change capture (the replication slot) is running from this moment on; None: not running
        # until the next subscription starts it, `_cold_start_s` later (`cold_start`).
        self._capture_from: float | None = -math.inf
        self._cold_start_s = 0.0
        self._tasks: trio.Nursery | None = None
        # Postgres's DEFAULT replica identity, as a new table has: a DELETE carries only the key, so it
        # never reaches a channel filtered by faction (7). A test redefines a table FULL, or with RLS.
        self.define_table("war_calls", columns=WAR_CALLS_COLUMNS)
        self.define_table("faction_messages", columns=FACTION_MESSAGES_COLUMNS)
        self.define_table("wars", columns=WARS_COLUMNS)
        # TOAST omission: None, or how long (as text) an unchanged value must be to be left out of an
        # UPDATE's record under DEFAULT identity (fake_tables.TOAST_BYTES is Postgres's ~2 kB).
        self.toast_bytes: int | None = None
        # Realtime's `poll_max_record_bytes`: a larger change is sent as an `Error 413` record.
        self.max_record_bytes = MAX_RECORD_BYTES
        # While set (NO_PRIMARY_KEY or UNAUTHORIZED), each INSERT and UPDATE is sent as that error
        # record, to every channel of the table whatever its filter, as apply_rls does.
        self.error_records: str | None = None

    def __repr__(self) -> str:
        return f"<FakeSupabase port={self._port} connections={len(self._connections)}>"

    # --- introspection ---

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeSupabase has no port before run() has started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self.port}{WEBSOCKET_PATHS[0]}"

    @property
    def connections(self) -> list[FakeConnection]:
        """Accepted sockets that have not begun to end."""
        return list(self._connections)

    def rows(self, table: str) -> list[Row]:
        return copy.deepcopy(list(self._table(table).rows.values()))

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, re-checking it after every change of the fake's state."""
        await trio.lowlevel.checkpoint()
        while True:
            changed = self._changed
            if predicate():
                return
            await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- scripting ---

    def refuse_upgrades(self, status: int, error: str | None = None, count: int | None = None) -> None:
        """Answer the next `count` upgrades (all until `accept_upgrades()`) with `status`, JSON body if `error`."""
        self._refusal = _fault((status, error), count)

    def accept_upgrades(self) -> None:
        self._refusal = None

    def fail_joins(self, reason: str, count: int | None = None) -> None:
        """Answer the next `count` joins (all until `accept_joins()`) with `{"reason": reason}`."""
        self._join_failure = _fault(reason, count)

    def accept_joins(self) -> None:
        self._join_failure = None

    def fail_rest(self, status: int, count: int | None = None) -> None:
        """Answer the next `count` REST requests (None: all until `accept_rest`) with `status`."""
        self._rest_failure = _fault(status, count)

    def accept_rest(self) -> None:
        self._rest_failure = None

    def fail_subscriptions(self, message: str, count: int | None = None) -> None:
        """After an ok join, send a `postgres_changes` system error instead of "Subscribed" (5.2)."""
        self._subscription_failure = _fault(message, count)

    def accept_subscriptions(self) -> None:
        self._subscription_failure = None

    def cold_start(self, window_s: float) -> None:
        """The project's change capture is not running: the next subscription starts it, and it reads
        the WAL only `window_s` after that subscription's "Subscribed" went out.

        The real server pushes "Subscribed" once the subscription row is inserted (`realtime_channel.ex`
        `after_connect` -> `Subscriptions.create`), while `ReplicationPoller` creates its temporary slot
        on its own schedule (`replications.ex` `pg_create_logical_replication_slot`), which also waits for
        running transactions: changes committed in between are never delivered to anyone (audit
        finding 2; realtime-js #525 "Premature SUBSCRIBED ... approx. 1-3 seconds").
        """
        self._capture_from = None
        self._cold_start_s = window_s

    @property
    def capturing(self) -> bool:
        return self._capture_from is not None and trio.current_time() >= self._capture_from

    def resubscribe(
        self, gap_s: float = 0.0, error: str | None = None, only: Iterable[FakeConnection] | None = None
    ) -> None:
        """The publication's tables changed: `subscription_manager.ex` `:check_oids` runs
        `Subscriptions.delete_all(conn)` and sends `:postgres_subscribe` to every subscribed channel,
        which subscribes again and pushes "Subscribed to PostgreSQL", or an error (audit finding 6).

        Every live channel stops receiving at once; `gap_s` later each subscribes again (changes
        committed in the gap are never delivered), sending `error` instead when it is given (a final
        one is not retried; any other is, when `retry_subscriptions` is on). `only`: these sockets'
        channels (the real server re-makes every subscriber's; a test may want one socket's alone)."""
        for connection in self._chosen(only):
            for channel in connection._channels.values():
                if channel.live and channel.wanted is not None:
                    channel.live = False
                    subscription = _Subscription(channel, channel.wanted, error)
                    self._start_task(self._subscribe_later, connection, subscription, gap_s)
        self._notify()

    def _start_task(self, *args: Any) -> None:
        if self._tasks is None:
            raise RuntimeError("FakeSupabase schedules nothing before run() has started")
        self._tasks.start_soon(*args)

    def connections_with(self, topic_part: str) -> list[FakeConnection]:
        """The live sockets with a joined channel whose topic contains `topic_part` (e.g. a faction id)."""
        return [c for c in self._connections if any(topic_part in topic for topic in c._channels)]

    def _chosen(self, only: Iterable[FakeConnection] | None) -> list[FakeConnection]:
        return list(self._connections) if only is None else [c for c in only if c in self._connections]

    def stop_heartbeat_replies(self, only: Iterable[FakeConnection] | None = None) -> None:
        """Every socket, now and later; or only the given sockets."""
        if only is None:
            self._heartbeat_replies = False
        for connection in self._chosen(only):
            connection.heartbeat_replies = False

    def resume_heartbeat_replies(self) -> None:
        self._heartbeat_replies = True
        for connection in self._connections:
            connection.heartbeat_replies = True

    def freeze(self, only: Iterable[FakeConnection] | None = None, *, answer_close: bool = True) -> None:
        """Stop reading and writing on the current sockets but keep their TCP open: a half-open peer.

        The WebSocket layer underneath still answers a close frame (and pings), as a server whose
        channel processes hang does. With `answer_close=False` the socket is not read at all any more,
        so a client's close is never answered either: a hung server whose kernel keeps the TCP open.
        """
        for connection in self._chosen(only):
            connection.frozen = True
            connection._io_scope.cancel()
            if not answer_close:
                connection._wire.hung = True
        self._notify()

    def drop_connections(
        self, code: int | None = None, reason: str = "", only: Iterable[FakeConnection] | None = None
    ) -> None:
        """End the sockets: with no close frame (the client sees 1006) when `code` is None."""
        for connection in self._chosen(only):
            if code is None:
                self._end(connection, _Abort())
            elif connection.frozen:
                self._end(connection, _Close(code, reason))
            else:
                connection._send(_Close(code, reason))  # after what is already queued, as a drain does

    def send_raw(self, text: str, only: Iterable[FakeConnection] | None = None) -> None:
        for connection in self._chosen(only):
            connection._send(text)

    def send_system_disconnect(self, only: Iterable[FakeConnection] | None = None) -> None:
        """A project configuration change: "Server requested disconnect" on every channel, then 1012 (5.4)."""
        for connection in self._chosen(only):
            for topic in connection._channels:
                payload = {"extension": "system", "status": "ok", "message": "Server requested disconnect"}
                connection._send(_frame(topic, "system", payload))  # this one has no `channel` key
            connection._send(_Close(1012, ""))

    def shutdown_channel(self, topic: str, message: str) -> None:
        """The server ends a channel: system error (extension "system"), then phx_close (5.3)."""
        for connection in self._connections:
            channel = connection._channels.pop(topic, None)
            if channel is not None:
                connection._send(_system(topic, extension="system", status="error", message=message))
                connection._send(_frame(topic, "phx_close", {}, channel.join_ref))
        self._notify()

    def stop_capture(self) -> None:
        """The project's change-capture workers stop, as they do on a region rebalance or when the
        poller gives up (audit finding 1, supabase/realtime `Extensions.PostgresCdcRls`): every
        channel stays joined and its heartbeats answered, but no change reaches anyone. The next
        subscribing join, from any socket, starts the workers cold, and a cold start deletes every
        subscription row (`Subscriptions.delete_all`), so the channels joined before stay deaf until
        they rejoin; nobody is told."""
        self._capture_running = False
        self._notify()

    def _restart_capture(self) -> None:
        for connection in self._connections:
            for channel in connection._channels.values():
                channel.live = False  # its subscription rows are gone: nothing matches it any more
        self._capture_running = True
        self.capture_restarts += 1

    def seed_history(self, faction_id: int, rows_per_table: int, first_key: int | None = None) -> None:
        """Give `faction_id` the history a faction that has used today's script carries: `rows_per_table`
        old calls and chat messages, written before anyone listened (never delivered)."""
        start = faction_id * 1_000_000 if first_key is None else first_key
        for n in range(rows_per_table):
            day = f"2026-11-{1 + n % 28:02d}T12:{n % 60:02d}:00.000Z"
            self.insert(
                "war_calls",
                {
                    "id": start + n,
                    "faction_id": faction_id,
                    "war_id": 1 + n // 50,
                    "target_id": 2_000_000 + n,
                    "target_name": f"Target{n}",
                    "caller_id": 3_000_000 + n % 40,
                    "caller_name": f"Caller{n % 40}",
                    "created_at": day,
                },
                deliver=False,
            )
            self.insert(
                "faction_messages",
                {
                    "id": start + n,
                    "faction_id": faction_id,
                    "sender_id": 3_000_000 + n % 40,
                    "sender_name": f"Caller{n % 40}",
                    "message": f"old message {n}",
                    "created_at": day,
                },
                deliver=False,
            )

    # --- tables ---

    def define_table(
        self,
        name: str,
        key: str = "id",
        replica_identity: ReplicaIdentity = "default",
        columns: Mapping[str, str] | None = None,
        *,
        rls: bool = False,
    ) -> None:
        """Define or redefine a table, keeping its rows (and columns unless given: name -> Postgres type)."""
        previous = self._tables.get(name)
        if columns is None:
            columns = previous.columns if previous is not None else {key: "int8"}
        rows = previous.rows if previous is not None else {}
        self._tables[name] = Table(name, key, replica_identity, dict(columns), rows, rls)

    def insert(self, table: str, row: Mapping[str, Any], deliver: bool = True) -> Row:
        target = self._table(table)
        new = copy.deepcopy(dict(row))
        key = target.key_of(new)
        if key in target.rows:
            raise ValueError(f"{table}: duplicate key {key!r}")
        target.learn_columns(new)
        target.rows[key] = new
        if deliver:
            self._publish(target, self._change_data(target, "INSERT", new=new, old=None), new)
        self._notify()
        return copy.deepcopy(new)

    def update(self, table: str, key_value: Any, changes: Mapping[str, Any], deliver: bool = True) -> Row:
        target = self._table(table)
        old = target.row(key_value)
        new = {**old, **copy.deepcopy(dict(changes))}
        new_key = target.key_of(new)
        if new_key != key_value and new_key in target.rows:
            raise ValueError(f"{table}: duplicate key {new_key!r}")
        target.learn_columns(new)
        del target.rows[key_value]
        target.rows[new_key] = new
        if deliver:
            # Filters see the new row only: a row moving out of a faction is not sent to it (7).
            self._publish(target, self._change_data(target, "UPDATE", new=new, old=old), new)
        self._notify()
        return copy.deepcopy(new)

    def delete(self, table: str, key_value: Any, deliver: bool = True) -> Row:
        target = self._table(table)
        old = target.row(key_value)
        del target.rows[key_value]
        if deliver:
            data = self._change_data(target, "DELETE", new=None, old=old)
            self._publish(target, data, target.identity(old))  # filters see only the identity columns (7)
        self._notify()
        return old

    def upsert(self, table: str, row: Mapping[str, Any], deliver: bool = True) -> Row:
        """An INSERT for a new key, otherwise an UPDATE to exactly `row`."""
        target = self._table(table)
        key = target.key_of(row)
        if key in target.rows:
            return self.update(table, key, row, deliver)
        return self.insert(table, row, deliver)

    async def flood(
        self,
        table: str,
        row_at: Callable[[int], Mapping[str, Any]],
        count: int,
        *,
        per_second: float | None = None,
    ) -> float:
        """Upsert `row_at(i)` for i in 0..count-1, each change sent on as it is made, so the tables
        stay exactly what was sent (a reconcile reads them). Without `per_second`, every change is
        queued before the first is sent: a burst. With it, paced in slices of `FLOOD_SLICE_S`; a
        slice that runs late writes what fell due meanwhile. Returns the most a slice ran late (s)."""
        target = self._table(table)
        if per_second is None:
            for index in range(count):
                self._flood_write(target, row_at(index))
            self._notify()
            return 0.0
        started, written, max_lag_s = trio.current_time(), 0, 0.0
        while written < count:
            now = trio.current_time()
            due = min(count, int((now - started) * per_second) + 1)
            max_lag_s = max(max_lag_s, now - (started + written / per_second))  # the oldest one due
            for index in range(written, due):
                self._flood_write(target, row_at(index))
            self._notify()
            written = due
            await trio.sleep_until(started + written / per_second + FLOOD_SLICE_S)
        return max_lag_s

    def _flood_write(self, target: Table, row: Mapping[str, Any]) -> None:
        """`upsert` without its defensive copies, which cost most of its time (~190 µs a change, too
        slow to flood at 5,000/s): a flood makes each row afresh and never touches it again."""
        new = dict(row)
        key = target.key_of(new)
        old = target.rows.get(key)
        target.learn_columns(new)
        target.rows[key] = new
        data = target.change_data("INSERT" if old is None else "UPDATE", new=None, old=None)
        data["record"] = new
        if old is not None:
            data["old_record"] = old if target.replica_identity == "full" else {target.key: key}
        self._publish(target, data, new)

    def _change_data(
        self, table: Table, change: ChangeType, *, new: Row | None, old: Row | None
    ) -> dict[str, Any]:
        if self.error_records is not None and change != "DELETE":
            return table.error_data(change, self.error_records)
        return table.change_data(
            change, new=new, old=old, toast_bytes=self.toast_bytes, max_record_bytes=self.max_record_bytes
        )

    def _table(self, name: str) -> Table:
        try:
            return self._tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r}; define_table() it first") from None

    def _publish(self, table: Table, data: dict[str, Any], filter_row: Row) -> None:
        if not self._capture_running:
            return
        for connection in self._connections:
            if connection.frozen:
                continue
            for channel in connection._channels.values():
                # An error record without a row (400, 401) goes to every subscription of the table:
                # apply_rls returns them before any filter is evaluated.
                no_row = not data.get("columns")
                ids = self._matching_ids(channel, table.name, data["type"], filter_row, no_row)
                if ids:  # one message per channel, listing every binding of it that matched (6.1)
                    connection._send(_frame(channel.topic, "postgres_changes", {"ids": ids, "data": data}))

    def _matching_ids(
        self, channel: _Channel, table: str, change: ChangeType, filter_row: Row, data_has_no_row: bool
    ) -> list[int]:
        ids: list[int] = []
        if not channel.live or not self.capturing:
            return ids
        for binding in channel.bindings:
            wanted = binding.wants(table, change) if self.filter_by_action else binding.table in ("*", table)
            if not wanted or binding.id in ids:
                continue
            unfiltered = (
                binding.filter is None
                or data_has_no_row
                or self.ignore_filters
                or (change == "DELETE" and self.deliver_deletes_unfiltered)
            )
            if unfiltered or (binding.filter is not None and binding.filter.matches(filter_row)):
                ids.append(binding.id)
        return ids

    # --- serving ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self._requested_port, host=self._host)
        self._port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            await nursery.start(trio.serve_listeners, self._handle_stream, listeners)
            logger.debug("%r listening", self)
            task_status.started()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        # trio-websocket's own reader task lives here; wrapping the stream ourselves (rather than
        # serve_websocket) keeps the raw stream at hand for an abort without a close frame.
        async with trio.open_nursery() as websocket_tasks:
            head: bytes | None = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                head = await read_head(stream)
            if head is None:
                await stream.aclose()
                return
            first = parse_head(head)
            if not first.is_upgrade:
                await self._serve_rest(stream, first)
                return
            request: WebSocketRequest | None = None
            wire = _HangableStream(ReplayStream(stream, head))
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                request = await wrap_server_stream(websocket_tasks, wire)
            if request is not None:
                with contextlib.suppress(ConnectionClosed):  # the client left during the handshake
                    await self._handle_request(request, stream, wire)
            websocket_tasks.cancel_scope.cancel()

    async def _serve_rest(self, stream: trio.SocketStream, request: RestRequest) -> None:
        self.rest_requests.append(request)
        self.rest_request_count += 1
        failure, self._rest_failure = _take(self._rest_failure)
        if failure is not None:
            response = http_response(failure, {"message": "scripted failure"})
        else:
            read = answer(request, self._tables, self.valid_keys, self.rest_max_rows)  # the rows, read now
            headers = [
                h for h in read.headers if not (self.rest_drop_content_range and h[0] == "Content-Range")
            ]
            response = http_response(read.status, read.body, headers)
        faction = request_faction(request)
        self.rest_bytes[faction] += len(response)
        self.rest_requests_by_faction[faction] += 1
        self._notify()
        if self.rest_hold is not None:
            await self.rest_hold.wait()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(response)
        await stream.aclose()

    async def _handle_request(
        self, request: WebSocketRequest, stream: trio.SocketStream, wire: _HangableStream
    ) -> None:
        self.upgrade_attempts += 1
        self._notify()
        decision = self._upgrade_decision(request)
        if isinstance(decision, _Refusal):
            logger.debug("%r refused an upgrade with %d", self, decision.status)
            if decision.delayed and self.refusal_delay_s > 0:
                await trio.sleep(self.refusal_delay_s)
            if decision.error is None:
                await request.reject(decision.status)
            else:
                body = json.dumps({"error": decision.error}).encode()
                await request.reject(
                    decision.status, extra_headers=[(b"content-type", b"application/json")], body=body
                )
            return
        apikey, vsn = decision
        ws = await request.accept()
        if not vsn.startswith("1."):
            await ws.aclose(1011, "this fake speaks vsn 1.0.0 framing only")
            return
        await self._serve(FakeConnection(ws, stream, apikey=apikey, wire=wire))

    def _upgrade_decision(self, request: WebSocketRequest) -> _Refusal | tuple[str, str]:
        """The refusal for this upgrade (1.3), or the accepted (apikey, vsn)."""
        target = urlsplit(request.path)
        if target.path not in WEBSOCKET_PATHS:
            return _Refusal(404, None, delayed=False)
        # The gateway in front answers before Realtime looks at anything.
        scripted, self._refusal = _take(self._refusal)
        if scripted is not None:
            return _Refusal(scripted[0], scripted[1], delayed=True)
        params = parse_qs(target.query)
        vsn = params.get("vsn", ["1.0.0"])[0]
        if not _vsn_supported(vsn):
            return _Refusal(403, None, delayed=False)  # Phoenix refuses before connect/3: no backoff
        headers = {name.lower(): value for name, value in request.headers}
        header_key = headers.get(b"x-api-key", b"").decode("latin-1")
        apikey = header_key or params.get("apikey", [""])[0]  # the header wins (1.1)
        if not apikey:
            return _Refusal(401, "API key is missing", delayed=True)
        if apikey not in self.valid_keys:
            return _Refusal(401, "Failed to validate JWT signature", delayed=True)
        return apikey, vsn

    async def _serve(self, connection: FakeConnection) -> None:
        self._connections.append(connection)
        self._notify()
        try:
            with connection._io_scope:
                async with trio.open_nursery() as io:
                    io.start_soon(self._read_loop, connection, io)
                    io.start_soon(self._write_loop, connection)
                    io.start_soon(self._idle_watch, connection)
            await connection._ended.wait()  # a frozen socket stays open until it is dropped
            await self._finish(connection)
        finally:
            if connection in self._connections:  # the whole server was cancelled
                self._connections.remove(connection)
                self._notify()

    def _end(self, connection: FakeConnection, how: _Ending) -> None:
        if connection._ending is not None:
            return
        connection._ending = how
        connection._io_scope.cancel()
        connection._ended.set()
        self._connections.remove(connection)
        self._notify()

    async def _finish(self, connection: FakeConnection) -> None:
        ending = connection._ending
        if isinstance(ending, _Close):
            with trio.move_on_after(CLOSE_HANDSHAKE_TIMEOUT_S):
                await connection._ws.aclose(ending.code, ending.reason or None)
        elif isinstance(ending, _Abort):
            await trio.aclose_forcefully(connection._stream)
        logger.debug("%r ended %r", connection, ending)
        self._notify()

    async def _read_loop(self, connection: FakeConnection, io: trio.Nursery) -> None:
        while True:
            try:
                message = await connection._ws.get_message()
            except ConnectionClosed:
                self._end(connection, _PeerGone())
                return
            connection._last_received = trio.current_time()  # any frame resets the idle timer (8)
            frame = _parse_inbound(message)
            if frame is None:
                continue  # logged and dropped by the real server; the socket stays open (2.1)
            connection.received.append(frame.raw)
            await self._dispatch(connection, frame, io)
            self._notify()

    async def _write_loop(self, connection: FakeConnection) -> None:
        after: _Outgoing | None = None  # a close taken from the outbox behind a batch of frames
        while True:
            item = after if after is not None else await connection._outbox_receive.receive()
            after = None
            if isinstance(item, _Close):
                self._end(connection, item)
                return
            frames = [item]
            delay = max(self.frame_delay_s, connection.frame_delay_s)
            if delay > 0:
                await trio.sleep(delay)
            else:
                after = self._take_queued(connection, frames)
            try:
                await self._send_frames(connection._ws, frames)
            except ConnectionClosed:
                self._end(connection, _PeerGone())
                return
            self._notify()

    @staticmethod
    def _take_queued(connection: FakeConnection, frames: list[str]) -> _Close | None:
        """Add what else is queued to `frames`, up to a close (returned, to be done after them)."""
        while len(frames) < WRITE_BATCH_FRAMES:
            try:
                item = connection._outbox_receive.receive_nowait()
            except trio.WouldBlock:
                return None
            if isinstance(item, _Close):
                return item
            frames.append(item)
        return None

    @staticmethod
    async def _send_frames(ws: WebSocketConnection, frames: list[str]) -> None:
        """Each frame its own WebSocket message, as the server sends them, but several in one write:
        one `send_message` each costs a trip through the scheduler, and a flood queued faster than
        that (~2,500 frames/s here) piles up in the outbox, heartbeat replies behind it. trio-websocket
        has no call for several messages, so its own framer and lock are used, as `send_message` does."""
        if len(frames) == 1:
            await ws.send_message(frames[0])
            return
        if ws.closed is not None:
            raise ConnectionClosed(ws.closed)
        try:
            data = b"".join(ws._wsproto.send(Message(data=frame)) for frame in frames)
        except LocalProtocolError:  # closing: the peer's close frame arrived meanwhile
            raise ConnectionClosed(ws.closed) from None
        async with ws._stream_lock:
            try:
                await ws._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ConnectionClosed(None) from None

    async def _idle_watch(self, connection: FakeConnection) -> None:
        while True:
            deadline = connection._last_received + self.idle_timeout_s
            if trio.current_time() >= deadline:
                self._end(connection, _Close(1000, ""))  # cowboy's idle timeout: 1000, empty reason (8)
                return
            await trio.sleep_until(deadline)

    # --- channel protocol (3, 4, 5, 8, 9) ---

    async def _dispatch(self, connection: FakeConnection, frame: _Inbound, io: trio.Nursery) -> None:
        if frame.topic == "phoenix" and frame.event == "heartbeat":
            connection.heartbeats += 1
            if self._heartbeat_replies and connection.heartbeat_replies:
                connection._send(_reply("phoenix", frame.ref, "ok", {}))
            return
        if frame.event == "phx_join":
            await self._join(connection, frame, io)
            return
        channel = connection._channels.get(frame.topic)
        if channel is None:
            # A leave for an unjoined topic is answered ok; anything else there is unmatched (3).
            if frame.event == "phx_leave":
                connection._send(_reply(frame.topic, frame.ref, "ok", {}))
            else:
                connection._send(_reply(frame.topic, frame.ref, "error", {"reason": "unmatched topic"}))
        elif frame.event == "phx_leave":
            del connection._channels[frame.topic]
            connection._send(_reply(frame.topic, frame.ref, "ok", {}))
            connection._send(_frame(frame.topic, "phx_close", {}, channel.join_ref))
        # access_token, broadcast and presence on a joined channel change nothing for postgres_changes.

    async def _join(self, connection: FakeConnection, frame: _Inbound, io: trio.Nursery) -> None:
        self.joins += 1
        self._notify()
        topic = frame.topic
        if not topic.startswith("realtime:"):
            connection._send(_reply(topic, frame.ref, "error", {"reason": "unmatched topic"}))
            return
        held: list[_Outgoing] = []
        if self.join_delay_s > 0:
            # Synchronous: this socket's read loop waits here, so the frames behind the join wait too,
            # and so does whatever its channels push meanwhile (written after this join's answer).
            connection._held = held
            try:
                await trio.sleep(self.join_delay_s)
            finally:
                connection._held = None
        try:
            await self._answer_join(connection, frame, io)
        finally:
            for item in held:
                connection._send(item)

    async def _answer_join(self, connection: FakeConnection, frame: _Inbound, io: trio.Nursery) -> None:
        topic = frame.topic
        # A duplicate join ends the old channel at once; its phx_close follows the new join's reply,
        # and comes before the new channel's "Subscribed", which needs a database round trip (3).
        old = connection._channels.pop(topic, None)
        reason, self._join_failure = _take(self._join_failure)
        if reason is None and topic == "realtime:":
            reason = "TopicNameRequired: You must provide a topic name"
        subscription = None
        if reason is not None:
            if self.join_error_delay_s > 0:
                # Phoenix's socket waits for the channel's answer, so this socket's other frames wait too.
                await trio.sleep(self.join_error_delay_s)
            connection._send(_reply(topic, frame.ref, "error", {"reason": reason}))
        else:
            subscription = self._open_channel(connection, frame)
        if old is not None:
            connection._send(_frame(topic, "phx_close", {}, old.join_ref))
        if reason is not None and reason.startswith(DISCONNECTING_JOIN_ERRORS):
            connection._send(_Close(1001, ""))
        if subscription is not None and self.subscribe_delay_s > 0:
            io.start_soon(self._subscribe_later, connection, subscription, self.subscribe_delay_s)
        elif subscription is not None:
            self._subscribe(connection, subscription)

    def _open_channel(self, connection: FakeConnection, frame: _Inbound) -> _Subscription | None:
        """Join the channel and send the ok reply; the subscription still to be made, if any."""
        config = frame.payload.get("config")
        raw_entries = config.get("postgres_changes") if isinstance(config, dict) else None
        # null entries are skipped (4.1); an unreadable config is only logged and the join goes on.
        entries = (
            [entry for entry in raw_entries if isinstance(entry, dict)]
            if isinstance(raw_entries, list)
            else []
        )
        channel = _Channel(frame.topic, frame.raw.get("join_ref"), [])
        connection._channels[frame.topic] = channel
        if "config" not in frame.payload:
            connection._send(_reply(frame.topic, frame.ref, "ok", {}))  # legacy mode: not emulated
            return None
        echoed = [{**entry, "id": binding_id(entry)} for entry in entries]  # echoed exactly, plus id (4.2)
        connection._send(_reply(frame.topic, frame.ref, "ok", {"postgres_changes": echoed}))
        if not entries:
            return None  # nothing to subscribe, so no system message either (4.2)
        try:
            bindings = [parse_binding(entry, self._tables) for entry in entries]
        except SubscriptionError as exc:
            return _Subscription(channel, [], str(exc))
        error, self._subscription_failure = _take(self._subscription_failure)
        return _Subscription(channel, bindings, error)

    async def _subscribe_later(
        self, connection: FakeConnection, subscription: _Subscription, delay_s: float
    ) -> None:
        await trio.sleep(delay_s)
        self._subscribe(connection, subscription)
        self._notify()

    def _subscribe(self, connection: FakeConnection, subscription: _Subscription) -> None:
        channel = subscription.channel
        if connection._channels.get(channel.topic) is not channel:
            return  # left, replaced or shut down before the subscription was made
        if subscription.error is not None:
            error = subscription.error
            connection._send(
                _system(channel.topic, extension="postgres_changes", status="error", message=error)
            )
            if self.retry_subscriptions and not error.startswith(FINAL_SUBSCRIPTION_ERRORS):
                # The same join tries again: the next attempt meets the scripted failure if any is left.
                retry, self._subscription_failure = _take(self._subscription_failure)
                again = _Subscription(channel, subscription.bindings, retry)
                self._start_task(
                    self._subscribe_later, connection, again, self.rng.uniform(*SUBSCRIPTION_RETRY_S)
                )
            return
        if not self._capture_running:
            self._restart_capture()
        channel.bindings = subscription.bindings
        channel.wanted = subscription.bindings
        channel.live = True
        if self._capture_from is None:  # this subscription starts capture, which lags behind it
            self._capture_from = trio.current_time() + self._cold_start_s
        connection._send(
            _system(channel.topic, extension="postgres_changes", status="ok", message=SUBSCRIBED)
        )
