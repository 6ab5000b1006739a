"""One upstream connection's life: open, join, heartbeat, read, hand changes on, end with a typed error.

Reading and delivering are two tasks: the reader never waits for the store, so a heartbeat reply is
seen as soon as it arrives, whatever the flood in front of it; it puts changes in a bounded backlog,
and the deliverer hands everything waiting there on as one batch (one commit), so a faster flood makes
bigger batches rather than a longer queue. When the backlog is full the oldest changes are dropped
and the owner is told (`ConnectionHooks.on_dropped`), then told again once the backlog has stayed
empty for `FLOOD_OVER_AFTER_S` (`on_caught_up`): what was dropped is gone from the socket for good,
and only a reconcile repairs it.

Under a flood the reader also comes first in time: the deliverer waits while the reader is behind
the socket (`relay.upstream.pacing`), and hands on at most MAX_BATCH_CHANGES at a time.

Retrying is the supervisor's job: `run_connection` returns only by raising an `UpstreamError` (or
being cancelled). trio-websocket, which is on life-support maintenance, is used only here, so
replacing it touches this file alone.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import urllib.parse
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import trio
import trio_websocket

from relay.upstream.pacing import ReaderFirst, Unread, unread_probe
from relay.upstream.phoenix import (
    AllChannelsLive,
    ChangeIgnored,
    ChangeReceived,
    ChannelSpec,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HandshakeRefused,
    HeartbeatAcknowledged,
    HeartbeatTimeout,
    Resubscribed,
    Session,
    SubscriptionFailed,
    SubscriptionRetrying,
    UpstreamError,
    socket_url,
)

# trio-websocket logs the request URL, which carries `?apikey=`, at DEBUG: keep its logger above that.
logging.getLogger("trio-websocket").setLevel(logging.INFO)

# Supabase sends "Subscribed to PostgreSQL" within ~8 s normally and retries failing subscriptions
# every 5-10 s on the same join; a connection that is still not live after this long (from its start,
# or from the moment a live channel's subscription failed) is cut and retried afresh: six or more of
# the server's own retries have failed by then.
LIVE_DEADLINE_S = 60.0
# Closing politely is worth a moment, not more: a server that never answers the close frame must not
# hold a reconnect hostage, nor a shutdown that arrives meanwhile (the wait is shielded, and the
# relay's whole shutdown has 5 s).
CLOSE_TIMEOUT_S = 1.0
# When the connection is being cancelled (a stop, the shutdown), trio-websocket's reader is cancelled
# with it and the answer can never be read: this is only enough to hand the close frame to the
# kernel on a healthy socket. All factions are cancelled at once, so they wait it out together.
CLOSE_NOTICE_S = 0.05
# Postgres change payloads are capped at 1 MiB by Supabase; allow headroom for the envelope.
MAX_FRAME_BYTES = 4 * 1024 * 1024
# trio-websocket's default reads 4 KiB at a time (five or six ~800-byte change frames): under a flood,
# read 64 KiB. Its queue of parsed messages is none at all: a message queued there is outside every
# byte bound (up to MAX_FRAME_BYTES), and 150 factions each parsing 128 ahead held a gigabyte when
# every faction was sent 1 MiB rows at once (bench/RESULTS-budget.md). `_read` is always waiting for
# the next message, so it is handed over as soon as it is whole, and nothing is held twice.
RECEIVE_BUFFER_BYTES = 64 * 1024
MESSAGE_QUEUE_SIZE = 0
# The backlog between reader and deliverer. The store commits ~8,700 batched changes/s
# (bench/RESULTS-ingest.md), so 10,000 changes is about a second of work: a burst that size is kept
# whole, while a flood the store cannot keep up with is cut after a second rather than growing without
# bound. A war call's frame is under 1 KiB, so 10,000 of them take under 10 MiB; the byte bound is
# for the unusual large row (up to 1 MiB each, above), and keeps 150 factions under ~2.4 GiB at worst.
MAX_BUFFERED_CHANGES = 10_000
MAX_BUFFERED_BYTES = 16 * 1024 * 1024
# And all factions' backlogs together, with the batches being stored: a 1 MiB change costs about six
# times its frame while it is parsed, encoded and written, so 16 MiB of frames is about 100 MiB at
# the peak, inside the relay's memory budget (README "Memory"), however many factions are sent large
# rows at once. Past it, the fullest backlog drops its oldest: the faction flooding pays, not the others.
MAX_UPSTREAM_BYTES = 16 * 1024 * 1024
# Phoenix's server closes a socket it has heard no heartbeat from for 60 s; until then, frames still
# being read mean the socket is busy, not dead, and a late heartbeat reply is waited for this long.
REPLY_PATIENCE_UNDER_DATA_S = 60.0
# A batch is at most this (~0.3 s of the store's work on a slow VM, the commit's own cost shared by a
# thousand changes already): under a flood the store is not handed ten seconds of work at once while
# the reader waits for the CPU.
MAX_BATCH_CHANGES = 1_000
# A flood is over once the backlog has stayed empty this long: the pause between two bursts, or the
# reader waiting on the socket for a moment, is still the same flood (one WARNING, one reconcile).
FLOOD_OVER_AFTER_S = 1.0

Deliver = Callable[[Sequence[ChangeReceived]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    url: str
    api_key: str
    heartbeat_interval_s: float
    connect_timeout_s: float
    max_buffered_changes: int = MAX_BUFFERED_CHANGES
    max_buffered_bytes: int = MAX_BUFFERED_BYTES
    # One for the whole relay: every faction's connection settings are this one object.
    upstream_bytes: UpstreamBytes = field(default_factory=lambda: UpstreamBytes(MAX_UPSTREAM_BYTES))


def _ignore_change(change: ChangeReceived) -> None:
    del change


def _ignore_drops(count: int) -> None:
    del count


def _ignore_catch_up() -> None:
    pass


def _ignore_round_trip(seconds: float) -> None:
    del seconds


def _ignore_resubscribed(table: str, live: bool) -> None:
    del table, live


def _ignore_open(unread: Unread) -> None:
    del unread


def _ignore_retry(table: str, message: str) -> None:
    del table, message


@dataclass(slots=True)
class ConnectionHooks:
    """What a connection tells its owner. `on_read` hears of each change as soon as it is read (the
    reconciler must know of it while a snapshot read is in flight, even if it is never stored);
    `deliver` gets the changes in order, one batch at a time, while the reader goes on; `on_dropped(n)` says the n oldest changes waiting were dropped (the
    backlog was full), `on_caught_up` that the backlog stayed empty for a while after a drop, and
    `on_heartbeat(s)` how long the latest heartbeat took to be answered. `on_retrying(table, message)`
    says the server reported an error it retries on the same join (the channel hears nothing until
    it is subscribed again), `on_resubscribed(table, live)` that a channel of a session once live was
    subscribed again (changes in between were never sent), and whether every channel is live now.
    `on_open(unread)` hands over, once the socket is open, how to ask how many bytes it holds unread."""

    deliver: Deliver
    on_live: Callable[[], None]
    on_ignored: Callable[[ChangeIgnored], None]
    on_read: Callable[[ChangeReceived], None] = _ignore_change
    on_dropped: Callable[[int], None] = _ignore_drops
    on_caught_up: Callable[[], None] = _ignore_catch_up
    on_heartbeat: Callable[[float], None] = _ignore_round_trip
    on_retrying: Callable[[str, str], None] = _ignore_retry
    on_resubscribed: Callable[[str, bool], None] = _ignore_resubscribed
    on_open: Callable[[Unread], None] = _ignore_open


async def run_connection(
    settings: ConnectionSettings, channels: Sequence[ChannelSpec], hooks: ConnectionHooks
) -> NoReturn:
    session = Session(channels, settings.api_key)
    ending: list[UpstreamError] = []
    with _translated_errors():
        target = urllib.parse.urlsplit(socket_url(settings.url, settings.api_key))
        stream = await _open_stream(target, settings.connect_timeout_s)
        # The stream is ours to close: trio-websocket 0.12 leaves the socket of a refused upgrade open.
        async with stream:
            try:
                async with trio.open_nursery() as ws_nursery:
                    ws = await _handshake(ws_nursery, stream, target, settings.connect_timeout_s)
                    try:
                        unread = unread_probe(stream)
                        hooks.on_open(unread)
                        pacing = ReaderFirst(unread)
                        await _converse(ws, session, hooks, settings, ending, pacing)
                    finally:
                        await _close_politely(ws)
                    ws_nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # trio-websocket raises a refused upgrade from its reader task, inside our nursery.
                raise _first_error(group) from None
    raise ending[0]


async def _close_politely(ws: trio_websocket.WebSocketConnection) -> None:
    """Send a close frame and wait, boundedly, for the server's answer.

    When we are being cancelled (stop, shutdown), trio-websocket's reader task is cancelled with us
    and the answer can never be read, so only the frame is sent: waiting would be time thrown away.
    """
    being_cancelled = trio.current_effective_deadline() == -math.inf
    with trio.move_on_after(CLOSE_NOTICE_S if being_cancelled else CLOSE_TIMEOUT_S, shield=True):
        await ws.aclose()


async def _open_stream(
    target: urllib.parse.SplitResult, timeout_s: float
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    secure = target.scheme == "wss"
    host, port = target.hostname or "", target.port or (443 if secure else 80)
    try:
        with trio.fail_after(timeout_s):
            if secure:
                return await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl.create_default_context(), https_compatible=True
                )
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectTimeout(f"no connection to {host}:{port} within {timeout_s:g} s") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from None


async def _handshake(
    nursery: trio.Nursery,
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    target: urllib.parse.SplitResult,
    timeout_s: float,
) -> trio_websocket.WebSocketConnection:
    resource = target.path + (f"?{target.query}" if target.query else "")
    host = target.netloc.rpartition("@")[2]
    try:
        # The upgrade gets the connect timeout again, as realtime-js gives the join its own.
        with trio.fail_after(timeout_s):
            return await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                host,
                resource,
                max_message_size=MAX_FRAME_BYTES,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                receive_buffer_size=RECEIVE_BUFFER_BYTES,
            )
    except trio.TooSlowError:
        raise ConnectTimeout(f"no WebSocket upgrade within {timeout_s:g} s") from None


async def _converse(
    ws: trio_websocket.WebSocketConnection,
    session: Session,
    hooks: ConnectionHooks,
    settings: ConnectionSettings,
    ending: list[UpstreamError],
    pacing: ReaderFirst,
) -> None:
    for frame in session.join_frames():
        await ws.send_message(frame)
    acks = _ReaderNews()
    backlog = Backlog(
        settings.max_buffered_changes, settings.max_buffered_bytes, settings.upstream_bytes, hooks.on_dropped
    )
    async with trio.open_nursery() as nursery:
        # Each task records how the connection ended and cancels the others, so the error leaves as
        # itself rather than wrapped in an ExceptionGroup (DeliveryFailed, not an UpstreamError,
        # leaves the nursery and is unwrapped by `run_connection`).
        for work in (
            _read(ws, session, hooks, acks, backlog),
            _deliver_batches(backlog, hooks, pacing),
            _heartbeat(ws, session, acks, settings.heartbeat_interval_s, hooks.on_heartbeat),
            _live_deadline(session, acks),
        ):
            nursery.start_soon(_until_ended, ending, nursery.cancel_scope, work)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error in a group; a group of nothing but cancellations must keep propagating."""
    real, _ = group.split(lambda exc: not isinstance(exc, trio.Cancelled))
    if real is None:
        raise group
    leaf: BaseException = real
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def _until_ended(ending: list[UpstreamError], scope: trio.CancelScope, work: Awaitable[None]) -> None:
    try:
        with _translated_errors():
            await work
    except UpstreamError as exc:
        ending.append(exc)
        scope.cancel()


class _ReaderNews:
    """The reader's word to the timers: that the pending heartbeat was answered, when it last read any
    frame, when every join was answered, and when a live session lost a channel's subscription."""

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.frame_at = trio.current_time()
        self.joins_answered = trio.Event()
        self.live_lost = trio.Event()

    def expect_next(self) -> trio.Event:
        self.answered = trio.Event()
        return self.answered


class UpstreamBytes:
    """The frame bytes of every change read from any upstream socket and not yet stored: all backlogs
    and the batches being stored. Past `max_bytes`, the fullest backlog drops its oldest change."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._backlogs: weakref.WeakSet[Backlog] = weakref.WeakSet()

    def add(self, backlog: Backlog) -> None:
        self._backlogs.add(backlog)

    def make_room(self) -> None:
        while self.held > self.max_bytes:
            fullest = max(self._backlogs, key=lambda backlog: backlog.bytes, default=None)
            if fullest is None or not fullest.bytes:
                return  # all of it is being stored: it leaves when the commits return
            fullest.drop_oldest()


class Backlog:
    """Changes read and not yet delivered, in order, bounded by count and by bytes, and by what all
    factions hold together (`UpstreamBytes`): a change that does not fit pushes the oldest out (the
    newest rows are the ones members need; the reconcile repairs the rest). Bytes are the frames'
    lengths, the memory that matters under a flood. Each drop is told to `on_dropped`."""

    def __init__(
        self,
        max_changes: int,
        max_bytes: int,
        shared: UpstreamBytes | None = None,
        on_dropped: Callable[[int], None] = _ignore_drops,
    ) -> None:
        self._max_changes = max_changes
        self._max_bytes = max_bytes
        self._shared = shared or UpstreamBytes(max(max_bytes, MAX_UPSTREAM_BYTES))
        self._shared.add(self)
        self._on_dropped = on_dropped
        self._items: deque[tuple[ChangeReceived, int]] = deque()
        self.bytes = 0
        self._waiting = trio.Event()
        self.dropped_since_empty = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, change: ChangeReceived, size: int) -> None:
        """Keep `change`, the oldest making way if the bounds say so."""
        self._items.append((change, size))
        self.bytes += size
        self._shared.held += size
        # The newest change stays even alone over the byte bound: a frame is already capped.
        while len(self._items) > 1 and (len(self._items) > self._max_changes or self.bytes > self._max_bytes):
            self.drop_oldest()
        self._shared.make_room()
        self._waiting.set()

    def drop_oldest(self) -> None:
        _, size = self._items.popleft()
        self.bytes -= size
        self._shared.held -= size
        self.dropped_since_empty += 1
        self._on_dropped(1)

    async def wait_for_changes(self) -> None:
        while not self._items:
            await self._waiting.wait()
            self._waiting = trio.Event()

    async def take(self, limit: int | None = None) -> tuple[list[ChangeReceived], int]:
        """The oldest `limit` changes waiting (all of them by default), once there is something, and
        their bytes: they stay counted relay-wide until `stored` is called with them."""
        await self.wait_for_changes()
        if limit is None or limit >= len(self._items):
            taken = [change for change, _ in self._items]
            size, self.bytes = self.bytes, 0
            self._items.clear()
            return taken, size
        taken, size = [], 0
        for _ in range(limit):
            change, change_size = self._items.popleft()
            taken.append(change)
            size += change_size
        self.bytes -= size
        return taken, size

    def stored(self, size: int) -> None:
        self._shared.held -= size


async def _read(
    ws: trio_websocket.WebSocketConnection,
    session: Session,
    hooks: ConnectionHooks,
    acks: _ReaderNews,
    backlog: Backlog,
) -> None:
    """Frames, as fast as they come: this task never waits for anything but the socket."""
    while True:
        message = await ws.get_message()
        acks.frame_at = trio.current_time()
        outcomes = session.receive(message)
        if not acks.joins_answered.is_set() and not session.joins_outstanding:
            acks.joins_answered.set()
        for outcome in outcomes:
            if isinstance(outcome, ChangeReceived):
                hooks.on_read(outcome)
                backlog.put(outcome, len(message) // len(outcomes))
            elif isinstance(outcome, ChangeIgnored):
                hooks.on_ignored(outcome)
            elif isinstance(outcome, AllChannelsLive):
                hooks.on_live()
            elif isinstance(outcome, HeartbeatAcknowledged):
                acks.answered.set()
            elif isinstance(outcome, SubscriptionRetrying):
                acks.live_lost.set()
                hooks.on_retrying(outcome.table, outcome.message)
            elif isinstance(outcome, Resubscribed):
                hooks.on_resubscribed(outcome.table, session.live)


async def _deliver_batches(backlog: Backlog, hooks: ConnectionHooks, pacing: ReaderFirst) -> None:
    """What is waiting, a batch at a time, while the reader goes on filling the backlog."""
    while True:
        if backlog.dropped_since_empty:
            with trio.move_on_after(FLOOD_OVER_AFTER_S):
                await backlog.wait_for_changes()
            if not backlog:
                backlog.dropped_since_empty = 0
                hooks.on_caught_up()
        await backlog.wait_for_changes()
        await pacing.turn()
        batch, size = await backlog.take(MAX_BATCH_CHANGES)
        try:
            await hooks.deliver(batch)
        finally:
            backlog.stored(size)
            pacing.done()


async def _heartbeat(
    ws: trio_websocket.WebSocketConnection,
    session: Session,
    acks: _ReaderNews,
    interval_s: float,
    on_round_trip: Callable[[float], None],
) -> None:
    """A heartbeat every interval; a reply missing for a whole interval means the socket is dead.

    Only the reply proves the return path works: other frames arriving do not (reference 8). The
    send is inside the deadline too, since a stalled peer can block it on a full TCP window. But
    under a flood the reader can be seconds behind the socket, the reply queued behind data: while
    frames keep being read, a late reply is waited for up to REPLY_PATIENCE_UNDER_DATA_S. The
    server closes a socket it hears no heartbeat from, and frames stop, so that is never a dead
    socket kept: only one kept busy.

    Phoenix answers a phx_join synchronously, and a Realtime join can take 15-24 s on a cold project
    (audit finding 8): a reply sent behind outstanding joins waits in the server's queue behind them.
    So its deadline starts when the last join is answered; the joins themselves are bounded by
    LIVE_DEADLINE_S, which names them when they are what is late.
    """
    while True:
        sent_at = trio.current_time()
        answered = acks.expect_next()
        with trio.move_on_after(interval_s) as deadline:
            await ws.send_message(session.heartbeat_frame())
            if not acks.joins_answered.is_set():
                deadline.deadline = math.inf
                await acks.joins_answered.wait()
                deadline.deadline = trio.current_time() + interval_s
            await answered.wait()
        waited_from = max(sent_at, deadline.deadline - interval_s)
        while (
            not answered.is_set()
            and trio.current_time() - acks.frame_at < interval_s
            and trio.current_time() - waited_from < REPLY_PATIENCE_UNDER_DATA_S
        ):
            with trio.move_on_after(
                min(interval_s, waited_from + REPLY_PATIENCE_UNDER_DATA_S - trio.current_time())
            ):
                await answered.wait()
        if not answered.is_set():
            raise HeartbeatTimeout(f"no heartbeat reply within {trio.current_time() - waited_from:g} s")
        on_round_trip(trio.current_time() - sent_at)
        await trio.sleep_until(sent_at + interval_s)


async def _live_deadline(session: Session, news: _ReaderNews) -> None:
    """Every channel live within LIVE_DEADLINE_S of the start, and again within LIVE_DEADLINE_S of
    losing a subscription (a `postgres_changes` error the server retries): its retries are waited
    for, boundedly, on the same socket."""
    deadline = trio.current_time() + LIVE_DEADLINE_S
    while True:
        await trio.sleep_until(deadline)
        if session.joins_outstanding:
            raise SubscriptionFailed(
                "*", f"{session.joins_outstanding} join(s) not answered after {LIVE_DEADLINE_S:g} s"
            )
        if not session.live:
            after = f" (the server's retries kept failing: {session.retrying})" if session.retrying else ""
            raise SubscriptionFailed("*", f"channels not live after {LIVE_DEADLINE_S:g} s{after}")
        await news.live_lost.wait()
        news.live_lost = trio.Event()
        deadline = trio.current_time() + LIVE_DEADLINE_S


@contextmanager
def _translated_errors() -> Iterator[None]:
    """trio-websocket's exceptions, as the relay's error tree names them."""
    try:
        yield
    except trio_websocket.ConnectionRejected as exc:
        raise HandshakeRefused(exc.status_code, _error_text(exc.body)) from None
    except trio_websocket.HandshakeError as exc:
        raise ConnectFailed(f"WebSocket handshake failed: {exc.__cause__ or exc}") from None
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        raise ConnectionLost(reason.code if reason else None, reason.reason if reason else None) from None


def _error_text(body: bytes | None) -> str | None:
    """The `error` of Supabase's JSON refusal body, or a short excerpt of whatever else came."""
    if not body:
        return None
    try:
        decoded = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, str):
        return error
    return body[:200].decode("utf-8", "replace")
