"""The Phoenix channel protocol as Supabase Realtime speaks it (vsn 1.0.0), without I/O.

`Session` turns one socket's inbound frames into outcomes and builds its outbound frames; it never
touches a socket or a clock, so every rule of the protocol reference is testable on strings alone.
This module also names every way an upstream connection can end (the error tree below).

    UpstreamError                   one connection ended; the supervisor backs off and reconnects
    ├── HandshakeRefused            the upgrade answered something other than 101 (401/403: auth)
    ├── ConnectFailed               no TCP/TLS connection (refused, DNS, unreachable)
    ├── ConnectTimeout              no upgrade within upstream.connect_timeout_s
    ├── ConnectionLost              the socket closed or broke (close code when there was one)
    ├── HeartbeatTimeout            a heartbeat reply missing for a whole heartbeat_interval_s
    ├── MalformedFrame              a frame that is not a vsn 1.0.0 JSON object
    └── ChannelFailed               a channel could not be, or stopped being, live
        ├── JoinRefused             phx_reply error to our phx_join (JWT reasons: auth)
        ├── BindingMismatch         the join reply does not echo what we asked for
        ├── SubscriptionFailed      joined, then not live in time (the server's own retries failed)
        │   └── SubscriptionMisconfigured   a `postgres_changes` error the server never retries
        └── ChannelClosedByServer   phx_close / phx_error / a `system` shutdown for our current join

`misconfigured` marks errors only an operator can fix (the table, the publication, the filter).
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VSN = "1.0.0"
HEARTBEAT_TOPIC = "phoenix"
SUBSCRIBED_MESSAGE = "Subscribed to PostgreSQL"
CHANGE_TYPES = frozenset({"INSERT", "UPDATE", "DELETE"})

# Join reasons that mean "your key is not accepted": retrying fast cannot help (reference 4.2).
AUTH_REASON_PREFIXES = (
    "MalformedJWT",
    "JwtSignatureError",
    "InvalidJWTToken",
    "Unauthorized",
    "JwtSignerError",
)
# Reasons after which Supabase wants clients to stay away for a while (reference 4.2, 10, 11).
RATE_LIMIT_REASON_PREFIXES = (
    "ClientJoinRateLimitReached",
    "ConnectionRateLimitReached",
    "ChannelRateLimitReached",
    "DatabaseConnectionRateLimitReached",
)
RATE_LIMITED_RETRY_S = 30.0
# `postgres_changes` errors the server gives up on: `realtime_channel.ex` handle_info(:postgres_subscribe)
# retries every error on the same join 5-10 s later, except `:malformed_subscription_params` and
# `:subscription_insert_failed` ("No point in retrying if the params are invalid"), whose messages
# start with these (protocol reference 5.2; audit finding 5). Everything else (`{:error, "Too many
# database timeouts"}`) is the database's passing trouble: the channel stays joined and is retried.
FINAL_SUBSCRIPTION_ERROR_PREFIXES = (
    "Unable to subscribe to changes with given parameters",
    "Error parsing `filter` params",
    "No subscription params provided",
)
# What a WebSocket library reports when the TCP connection ended without a close frame.
ABNORMAL_CLOSURE = 1006


class UpstreamError(Exception):
    """One upstream connection ended. `auth` marks credential refusals, `misconfigured` subscriptions
    only an operator can fix, `retry_after_s` a server's wish."""

    auth: bool = False
    misconfigured: bool = False
    retry_after_s: float | None = None


class HandshakeRefused(UpstreamError):
    def __init__(self, status: int, error: str | None) -> None:
        super().__init__(f"upgrade refused: HTTP {status}" + (f" {error}" if error else ""))
        self.status = status
        self.auth = status in (401, 403)
        if status == 429:
            self.retry_after_s = RATE_LIMITED_RETRY_S


class ConnectFailed(UpstreamError):
    pass


class ConnectTimeout(UpstreamError):
    pass


class ConnectionLost(UpstreamError):
    def __init__(self, code: int | None, reason: str | None = None) -> None:
        if code in (None, ABNORMAL_CLOSURE):
            what = "socket broke without a close frame"
        else:
            what = f"socket closed with {code}"
        super().__init__(what + (f" ({reason})" if reason else ""))
        self.code = code


class HeartbeatTimeout(UpstreamError):
    pass


class MalformedFrame(UpstreamError):
    pass


class ChannelFailed(UpstreamError):
    def __init__(self, topic: str, detail: str) -> None:
        super().__init__(f"{topic}: {detail}")
        self.topic = topic
        self.detail = detail


class JoinRefused(ChannelFailed):
    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(topic, f"join refused: {reason}")
        self.auth = reason.startswith(AUTH_REASON_PREFIXES)
        if reason.startswith(RATE_LIMIT_REASON_PREFIXES):
            self.retry_after_s = RATE_LIMITED_RETRY_S


class BindingMismatch(ChannelFailed):
    pass


class SubscriptionFailed(ChannelFailed):
    pass


class SubscriptionMisconfigured(SubscriptionFailed):
    misconfigured = True


class ChannelClosedByServer(ChannelFailed):
    pass


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One Phoenix channel: a postgres_changes subscription to one table under one filter."""

    table: str
    filter: str
    event: str = "*"  # or one change type, e.g. the relay-wide DELETE subscription

    @property
    def topic(self) -> str:
        only = "" if self.event == "*" else f":{self.event.lower()}"
        return f"realtime:public:{self.table}:{self.filter}{only}"

    def binding(self) -> dict[str, str]:
        # An empty filter is omitted, never sent as null: the server rejects null (reference 4.1).
        entry = {"event": self.event, "schema": "public", "table": self.table}
        if self.filter:
            entry["filter"] = self.filter
        return entry


def socket_url(base_url: str, api_key: str) -> str:
    """The upstream URL with `apikey` and `vsn` added to whatever query it already has."""
    parts = urllib.parse.urlsplit(base_url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k not in ("apikey", "vsn")] + [("apikey", api_key), ("vsn", VSN)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def encode(
    topic: str, event: str, payload: Mapping[str, Any], ref: str | None, join_ref: str | None = None
) -> str:
    frame: dict[str, Any] = {"topic": topic, "event": event, "payload": payload, "ref": ref}
    if join_ref is not None:
        frame["join_ref"] = join_ref
    return json.dumps(frame, separators=(",", ":"))


# --- outcomes of feeding a frame to a Session -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartbeatAcknowledged:
    pass


@dataclass(frozen=True, slots=True)
class AllChannelsLive:
    pass


@dataclass(frozen=True, slots=True)
class Resubscribed:
    """A channel of a session already live said "Subscribed to PostgreSQL" again: the server deleted
    and re-made its subscription (a publication change, or its own retry after an error), and changes
    committed in between were never sent (audit finding 6)."""

    table: str


@dataclass(frozen=True, slots=True)
class SubscriptionRetrying:
    """A `postgres_changes` error the server retries on the same join (5-10 s later): the channel
    gets no changes until it says "Subscribed" again."""

    table: str
    message: str


@dataclass(frozen=True, slots=True)
class ChangeReceived:
    """A row change in the realtime-js shape that today's userscript reads as a message's `payload`."""

    table: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChangeIgnored:
    """A change that is not ours: the server's filter let through a row of another faction."""

    table: str
    reason: str


Outcome = (
    HeartbeatAcknowledged
    | AllChannelsLive
    | Resubscribed
    | SubscriptionRetrying
    | ChangeReceived
    | ChangeIgnored
)


@dataclass(slots=True)
class _Channel:
    spec: ChannelSpec
    join_ref: str | None = None
    binding_id: int | None = None
    joined: bool = False
    live: bool = False


@dataclass(slots=True)
class Session:
    """The protocol state of one upstream socket: refs, joins, liveness, the pending heartbeat."""

    specs: Sequence[ChannelSpec]
    access_token: str
    _channels: dict[str, _Channel] = field(init=False)
    _next_ref: int = field(init=False, default=0)
    _pending_heartbeat: str | None = field(init=False, default=None)
    _announced_live: bool = field(init=False, default=False)
    retrying: str | None = field(init=False, default=None)  # the latest error the server retries

    def __post_init__(self) -> None:
        self._channels = {spec.topic: _Channel(spec) for spec in self.specs}

    @property
    def live(self) -> bool:
        return all(channel.live for channel in self._channels.values())

    @property
    def joins_outstanding(self) -> int:
        """Joins sent and not yet answered: Phoenix answers them in order, before any later frame."""
        return sum(not channel.joined for channel in self._channels.values())

    @property
    def heartbeat_pending(self) -> bool:
        return self._pending_heartbeat is not None

    def _ref(self) -> str:
        self._next_ref += 1
        return str(self._next_ref)

    def join_frames(self) -> list[str]:
        frames = []
        for topic, channel in self._channels.items():
            channel.join_ref = self._ref()
            channel.joined = channel.live = False
            payload = {
                "config": {
                    "broadcast": {"ack": False, "self": False},
                    "presence": {"enabled": False, "key": ""},
                    "postgres_changes": [channel.spec.binding()],
                    "private": False,
                },
                "access_token": self.access_token,
            }
            frames.append(encode(topic, "phx_join", payload, channel.join_ref, channel.join_ref))
        return frames

    def heartbeat_frame(self) -> str:
        self._pending_heartbeat = self._ref()
        return encode(HEARTBEAT_TOPIC, "heartbeat", {}, self._pending_heartbeat)

    def receive(self, text: str | bytes) -> list[Outcome]:
        """Apply one inbound frame; raise the UpstreamError that ends the connection, if it does."""
        frame = parse_frame(text)
        event, topic = frame["event"], frame["topic"]
        if event == "phx_reply":
            return list(self._on_reply(topic, frame["ref"], frame["payload"]))
        channel = self._channels.get(topic)
        if channel is None:
            return []  # presence, broadcasts and stale topics are not ours to act on (reference 13.11)
        if event == "postgres_changes":
            return [self._on_change(channel, frame["payload"])] if channel.joined else []
        if event == "system":
            return list(self._on_system(channel, frame["payload"]))
        if event in ("phx_close", "phx_error") and frame["ref"] == channel.join_ref:
            # Only our current join counts: a duplicate join's old half arrives late (reference 3, 13.12).
            raise ChannelClosedByServer(topic, f"{event} from server")
        return []

    def _on_reply(self, topic: str, ref: Any, payload: Mapping[str, Any]) -> Iterator[Outcome]:
        if topic == HEARTBEAT_TOPIC:
            if ref is not None and ref == self._pending_heartbeat:
                self._pending_heartbeat = None
                yield HeartbeatAcknowledged()
            return
        channel = self._channels.get(topic)
        if channel is None or ref is None or ref != channel.join_ref or channel.joined:
            return
        status, response = payload.get("status"), payload.get("response")
        if status != "ok":
            reason = response.get("reason") if isinstance(response, Mapping) else None
            raise JoinRefused(topic, str(reason or response))
        channel.binding_id = _check_binding(channel.spec, response)
        channel.joined = True

    def _on_system(self, channel: _Channel, payload: Mapping[str, Any]) -> Iterator[Outcome]:
        status, message = payload.get("status"), str(payload.get("message", ""))
        extension = payload.get("extension")
        if status == "error" and extension == "postgres_changes":
            if message.startswith(FINAL_SUBSCRIPTION_ERROR_PREFIXES):
                raise SubscriptionMisconfigured(channel.spec.topic, message)
            if channel.joined:
                # The server deleted nothing it will not make again: it retries this join by itself.
                channel.live = False
                self.retrying = message
                yield SubscriptionRetrying(channel.spec.table, message)
            return
        if status == "error":
            raise ChannelClosedByServer(channel.spec.topic, message)
        if extension == "postgres_changes" and message == SUBSCRIBED_MESSAGE and channel.joined:
            channel.live = True
            if self.live:
                self.retrying = None
            if self._announced_live:
                yield Resubscribed(channel.spec.table)
            elif self.live:
                self._announced_live = True
                yield AllChannelsLive()

    def _on_change(self, channel: _Channel, payload: dict[str, Any]) -> Outcome:
        # Parsed JSON holds dicts, never other mappings: `isinstance(x, dict)` is several times
        # cheaper than an ABC check, and this runs for every change of a flood.
        ids, data = payload.get("ids"), payload.get("data")
        if not isinstance(data, dict):
            raise MalformedFrame(f"{channel.spec.topic}: postgres_changes without a data object")
        if isinstance(ids, list) and channel.binding_id not in ids:
            return ChangeIgnored(channel.spec.table, "not addressed to our binding")
        change = to_realtime_js(data)
        event = channel.spec.event
        if event != "*" and change["eventType"] != event.upper():
            # Servers before the 2025-11 migrations send every type whatever the binding's event; realtime-js
            # drops these (`RealtimeChannel.ts` `_updateFilterMessage`), and so do we (audit finding 7).
            return ChangeIgnored(channel.spec.table, f"{change['eventType']} on a {event} binding")
        row = change["old"] if change["eventType"] == "DELETE" else change["new"]
        mismatch = filter_mismatch(channel.spec.filter, row)
        if mismatch is not None:
            return ChangeIgnored(channel.spec.table, mismatch)
        return ChangeReceived(channel.spec.table, change)


def parse_frame(text: str | bytes) -> dict[str, Any]:
    """A vsn 1.0.0 frame: one JSON object with `topic`, `event`, `payload` (object) and `ref`."""
    try:
        frame = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"frame is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedFrame("frame is nested too deeply to parse") from None
    if not isinstance(frame, dict):
        raise MalformedFrame("frame is not a JSON object")
    if not isinstance(frame.get("topic"), str) or not isinstance(frame.get("event"), str):
        raise MalformedFrame("frame lacks a string topic or event")
    if not isinstance(frame.get("payload"), dict):
        raise MalformedFrame("frame payload is not an object")
    frame.setdefault("ref", None)
    return frame


def _check_binding(spec: ChannelSpec, response: Any) -> int:
    """The id the server gave our one binding, after checking it echoes exactly what we sent."""
    entries = response.get("postgres_changes") if isinstance(response, Mapping) else None
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], Mapping):
        raise BindingMismatch(spec.topic, f"join reply does not echo one binding: {response!r}")
    echoed, sent = entries[0], spec.binding()
    if any(echoed.get(key) != value for key, value in sent.items()):
        raise BindingMismatch(spec.topic, f"join reply echoed {dict(echoed)!r} for {sent!r}")
    binding_id = echoed.get("id")
    if not isinstance(binding_id, int) or isinstance(binding_id, bool):
        raise BindingMismatch(spec.topic, f"join reply binding has no integer id: {binding_id!r}")
    return binding_id


def to_realtime_js(data: dict[str, Any]) -> dict[str, Any]:
    """The server's change (reference 6.1) in the shape realtime-js hands to applications (6.3).
    `data` is a freshly parsed frame's, so its records are taken over, not copied."""
    change_type = data.get("type")
    if change_type not in CHANGE_TYPES:
        raise MalformedFrame(f"postgres_changes with unknown type {change_type!r}")
    record, old_record = data.get("record"), data.get("old_record")
    return {
        "schema": data.get("schema"),
        "table": data.get("table"),
        "commit_timestamp": data.get("commit_timestamp"),
        "eventType": change_type,
        "new": record if change_type != "DELETE" and isinstance(record, dict) else {},
        "old": old_record if change_type != "INSERT" and isinstance(old_record, dict) else {},
        "errors": data.get("errors"),
    }


def filter_mismatch(filter_text: str, row: Mapping[str, Any]) -> str | None:
    """Why `row` fails the channel's own `col=eq.value` conditions, or None when it passes.

    Servers of 2022-09..2024-08 sent every DELETE to every filtered channel (reference 7), so the
    relay checks rows itself. A column absent from the row (a key-only `old`) cannot be checked and
    passes; operators other than `eq` are left to the server.
    """
    for condition, column, expected in _equalities(filter_text):
        if column in row and _filter_text(row[column]) != expected:
            return f"{column}={_filter_text(row[column])} does not match {condition}"
    return None


@functools.lru_cache(maxsize=1024)  # a few filters, checked once per change: parsed once each
def _equalities(filter_text: str) -> tuple[tuple[str, str, str], ...]:
    """The filter's `col=eq.value` conditions: each as written, its column and the value's text."""
    found = []
    for condition in split_conditions(filter_text):
        column, _, rest = condition.partition("=")
        op, _, expected = rest.partition(".")
        if op == "eq":
            found.append((condition, column, expected.strip('"')))
    return tuple(found)


def split_conditions(filter_text: str) -> list[str]:
    """A filter's ANDed conditions: split at commas outside parentheses and double quotes (reference 7)."""
    conditions: list[str] = []
    current: list[str] = []
    depth, quoted = 0, False
    for char in filter_text:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif char == "," and not quoted and depth == 0:
            conditions.append("".join(current))
            current = []
            continue
        current.append(char)
    conditions.append("".join(current))
    return [condition.strip() for condition in conditions if condition.strip()]


def _filter_text(value: Any) -> str:
    # Postgres casts the filter's text to the column type; comparing the JSON value's text form
    # matches it for the integer and text keys factions are filtered on.
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)
