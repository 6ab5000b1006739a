"""The relay's own trio layer between its listening sockets and hypercorn's sans-IO HTTP/1.1 protocol.

hypercorn stays the server of the app: its `H11Protocol` and `HTTPStream` parse requests, build
ASGI scopes and frame answers, byte for byte as before. What is replaced is hypercorn's trio worker
(`hypercorn/trio/run.py`, `tcp_server.py`, `task_group.py`), which any client could take down
(issue 13): its `_close()` sent EOF without the send lock, so a client that vanished while an early
answer was written raised `BusyResourceError` out of the connection and ended the whole server; a
failure in one connection reached `serve_listeners`' nursery; its shielded sends let a reader that
stopped reading hold shutdown for as long as it liked; and it spoke HTTP/2, whose hypercorn code
raised on hostile frames.

Here, per connection:

- every write, the end-of-stream and the close go through one lock and one `closed` flag, so they
  never race; a client that vanishes is counted and logged at DEBUG, never raised;
- a write that makes no progress for `WRITE_STALL_S` cuts the connection (a reader that stopped
  reading); writes are never shielded, so shutdown's deadline reaches them;
- the keep-alive timer is the read's own cancel scope deadline, not a task restarted per request;
- after a graceful close the socket is drained briefly (`LINGER_S`) before it is closed, so that an
  early answer (413, 401) reaches a client still sending its body instead of being lost to an RST;
- a failure while serving is contained in that connection: logged once (WARNING, the peer and the
  traceback), counted, the connection closed; everything else goes on.

Between requests, a whole head of a hot read path (`GET /events`, long-polls included, `GET /ping`) is answered
before hypercorn's protocol sees it (`relay.http.hotpath`): the same answer, without h11 and
hypercorn's per-request machinery, measured at three times the requests per second.

HTTP/2 is off on this port: an `Upgrade: h2c` is ignored (the request is answered over HTTP/1.1) and
a prior-knowledge preface is answered 505. Members reach the relay over HTTP/1.1; HTTP/2 to
browsers is nginx's job (deploy/nginx.conf). TLS is nginx's job too.

Accepting stops while `max_connections` are open (the kernel's backlog holds the rest), so held
requests can never take the descriptors the upstream sockets and the database need; running out of
descriptors anyway is logged once per episode, without a traceback, and accepting resumes when
connections close.

Written against hypercorn 0.18.0 (`HYPERCORN_VERSION`); `tests/test_http_server.py` fails if the
hypercorn internals used here change.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from math import inf
from typing import Any, cast

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, TaskGroup
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from relay.config import Config
from relay.http.hotpath import HotPath, parse_hot_head
from relay.http.stats import ConnectionCounters

log = logging.getLogger(__name__)

# Long enough for any answer in flight (milliseconds; held requests return at `stopping`). Hypercorn
# 0.18 also keeps idle keep-alive connections open until this deadline, so it is what a clean
# shutdown costs whenever a browser is connected: keep it short.
GRACEFUL_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 5.0
MAX_HEAD_BYTES = 16 * 1024
# Connections the kernel queues before hypercorn accepts them (Linux caps it at net.core.somaxconn,
# 4096 by default). hypercorn's default of 100 overflowed under `make bench`'s 15,000 SSE clients
# connecting at once, which is what every member's browser does after a restart.
LISTEN_BACKLOG = 4096

HYPERCORN_VERSION = "0.18.0"
# hypercorn's own read size.
MAX_RECV = 2**16
# A reader that takes nothing for this long is gone or stuck: its connection is cut. An honest phone
# on a slow link still takes something every few seconds; a held SSE stream is written at least every
# 22.5 s (keep-alives), so a stuck stream is found within about a minute.
WRITE_STALL_S = 15.0
# Writes are sliced so that the stall bound is on progress, not on the whole answer: a 5 MB answer
# to a slow phone is not a stalled one.
WRITE_SLICE_BYTES = 256 * 1024
# Up to this, a body's data is copied into one write with its framing: cheaper than two more send(2)s.
JOINED_DATA_BYTES = 64 * 1024
# After answering and sending our end of stream, how long a connection keeps reading (and dropping)
# what the client still sends, so that the answer is not destroyed by an RST.
LINGER_S = 1.0
# How long to wait before accepting again when the process is out of descriptors or buffers.
ACCEPT_RETRY_S = 0.1
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A connection reset or refused between the kernel's handshake and our accept (as trio's own list).
_IGNORABLE_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
# Connections taken each time the listening socket is ready (see `_accept_forever`).
ACCEPT_BATCH = 256


class CannotListen(Exception):
    """The relay's address cannot be listened on (in use, a privileged port, no such address): a
    start-up problem of the operator's, said in one line (`relay.cli`)."""


class _HTTP2Refused(Exception):
    """Raised out of the protocol once a prior-knowledge HTTP/2 preface has been answered 505."""


class _HeadTooLarge(Exception):
    """Raised out of the protocol once a head over MAX_HEAD_BYTES has been answered 431."""


def head_bytes(event: h11.Request) -> int:
    """The size of the request head as sent, less any optional whitespace h11 stripped."""
    request_line = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n")
    fields = sum(len(name) + len(value) + len(b": \r\n") for name, value in event.headers.raw_items())
    return request_line + fields + len(b"\r\n")


class RelayH11(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with HTTP/2 off, heads capped at MAX_HEAD_BYTES however they
    arrive, and answers written without h11's copy."""

    async def _check_protocol(self, event: h11.Request) -> None:
        # hypercorn's version answers `Upgrade: h2c` with 101 and raises to switch protocols; an
        # upgrade is the server's to decline, so the request is simply served over HTTP/1.1.
        if event.http_version not in (b"1.0", b"1.1"):
            await self._send_error_response(505)
            raise _HTTP2Refused
        # h11 limits only the head it holds incomplete: one that arrives whole in a read (up to
        # MAX_RECV) passed. The same answer h11's own limit gives: 431, then the connection closed.
        if head_bytes(event) > MAX_HEAD_BYTES:
            await self._send_error_response(431)
            raise _HeadTooLarge

    async def _send_h11_event(self, event: Any) -> None:
        # h11's `send` joins an answer's body into one new bytes object; with a large body's data
        # passed through, every member sent the same answer shares one object, however slowly each
        # reads. A small body (an SSE message, with its chunk framing either side) is joined into
        # one write: three writes, each a send(2), made an SSE message cost 1.45x the CPU.
        connection = self.connection
        if not isinstance(connection, h11.Connection):  # a WebSocket's pass-through connection
            await super()._send_h11_event(event)
            return
        try:
            pieces = connection.send_with_data_passthrough(event)
        except h11.LocalProtocolError:
            if connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Data) and len(event.data) > JOINED_DATA_BYTES:
            for piece in pieces or ():
                await self.send(RawData(data=piece))
        elif pieces:
            await self.send(RawData(data=b"".join(pieces)))  # a head, or a small body and its framing


class _AppTasks:
    """What hypercorn's protocol classes need of a task group: the connection's own nursery."""

    def __init__(self, nursery: trio.Nursery, max_queue: int) -> None:
        self._nursery = nursery
        self._max_queue = max_queue

    async def spawn_app(
        self,
        app: Any,
        config: HypercornConfig,
        scope: Any,
        send: Callable[[Any], Awaitable[None]],
    ) -> Callable[[Any], Awaitable[None]]:
        to_app, app_inbox = trio.open_memory_channel[Any](self._max_queue)
        self._nursery.start_soon(_run_app, app, scope, app_inbox, send)

        async def put(message: Any) -> None:
            # Once the app has returned nobody reads its inbox: a body still arriving, or the
            # disconnect, is dropped rather than blocking the reader (and the connection) forever.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await to_app.send(message)

        return put

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._nursery.start_soon(func, *args)


async def _run_app(
    app: Any,
    scope: Any,
    inbox: trio.MemoryReceiveChannel[Any],
    send: Callable[[Any], Awaitable[None]],
) -> None:
    # An exception leaves through the connection's nursery to `_serve_connection`, which contains it.
    with inbox:
        await app(scope, inbox.receive, send, trio.to_thread.run_sync, trio.from_thread.run)
    await send(None)  # hypercorn's "the app has finished": a 500 if it never answered


class Connection:
    """One accepted socket, served until either side closes it."""

    def __init__(
        self,
        stream: trio.SocketStream,
        app: Any,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        counters: ConnectionCounters,
        hot: HotPath | None = None,
    ) -> None:
        self._stream = stream
        self._hot = hot
        self._held_extra = b""
        self._app = app
        self._config = config
        self._context = context
        self._state = state
        self._counters = counters
        self._send_lock = trio.Lock()
        self._closed = False  # no more writes: our end of stream is sent, or the socket is gone
        self._idle = True
        self._read_scope: trio.CancelScope | None = None
        self._read_deadline = inf
        self.peer = "?"
        self._protocol: RelayH11

    def __repr__(self) -> str:
        return f"Connection({self.peer})"

    async def run(self) -> None:
        socket = self._stream.socket
        try:
            peer_address = socket.getpeername()
            server = parse_socket_addr(socket.family, socket.getsockname())
        except OSError:  # gone before it was served
            self._counters.vanished += 1
            return
        client = parse_socket_addr(socket.family, peer_address)
        self._client, self._server = client, server
        self.peer = repr_socket_addr(socket.family, peer_address)
        async with trio.open_nursery() as nursery:
            self._protocol = RelayH11(
                self._app,
                self._config,
                self._context,
                # The protocol classes only spawn; entering and leaving is this connection's nursery.
                cast(TaskGroup, _AppTasks(nursery, self._config.max_app_queue_size)),
                self._state,
                False,
                client,
                server,
                self._protocol_send,
            )
            self._set_idle(True)
            await self._read_until_closed()

    def stop_if_idle(self) -> None:
        """Shutdown: a connection between requests closes now; one mid-request after its answer."""
        if self._idle:
            self._set_read_deadline(-inf)

    async def _read_until_closed(self) -> None:
        """Feed the protocol until the client's end of stream, a reset, the keep-alive or shutdown
        deadline, or our own close (after which what still comes is dropped for `LINGER_S`)."""
        while True:
            with trio.CancelScope(deadline=self._read_deadline) as scope:
                self._read_scope = scope
                try:
                    data = await self._stream.receive_some(MAX_RECV)
                except trio.BrokenResourceError:
                    if not self._idle and not self._closed:
                        self._note_vanished("reset the connection mid-request")
                    break
                except trio.ClosedResourceError:  # closed by us: a stalled reader cut
                    break
                finally:
                    self._read_scope = None
            if scope.cancelled_caught or (not data and self._closed):
                break
            if self._closed:
                continue  # lingering: our answer is out and our end closed
            if not data and not self._idle:
                self._note_vanished("closed its end mid-request")
            if data and self._hot is not None and self._hot.enabled and self._between_requests():
                data = await self._answer_hot_heads(bytes(data))
                if not data:
                    continue
            try:
                await self._protocol.handle(RawData(data=bytes(data)))
            except _HTTP2Refused:
                self._counters.http2_refused += 1
                await self._close()
                continue
            except _HeadTooLarge:
                await self._close()
                continue
            if not data:
                break
        # The app learns the client is gone (http.disconnect); its task ends the connection's nursery.
        await self._protocol.handle(Closed())

    def _between_requests(self) -> bool:
        """hypercorn's protocol is idle with nothing buffered: the next bytes start a request."""
        protocol = self._protocol
        connection = protocol.connection
        return (
            protocol.stream is None
            and isinstance(connection, h11.Connection)
            and connection.our_state is h11.IDLE
            and connection.their_state is h11.IDLE
            and not connection.trailing_data[0]
            and not self._closed
            and not self._context.terminated.is_set()
        )

    async def _answer_hot_heads(self, data: bytes) -> bytes:
        """Answer each whole hot head at the front of `data` (relay.http.hotpath); the rest, from the
        first head that is not hot or not whole, is hypercorn's."""
        assert self._hot is not None
        protocol = self._protocol
        while data:
            end = data.find(b"\r\n\r\n")
            if end < 0 or end + 4 > MAX_HEAD_BYTES:
                return data
            if protocol.keep_alive_requests + 1 >= self._config.keep_alive_max_requests:
                return data  # its answer says `Connection: close`: hypercorn's to write
            raw_head = data[: end + 4]
            head = parse_hot_head(raw_head)
            if head is None:
                return data
            data = data[end + 4 :]
            self._set_idle(False)
            protocol.keep_alive_requests += 1
            await self._context.mark_request()
            answer, close = await self._hot.answer(
                head, raw_head, self._client, self._server, self._state, self._listen_while_held
            )
            data = data + self._held_extra  # what the client sent while its request was held
            self._held_extra = b""
            await self._write(answer)
            if close:
                await self._close()
                return b""
            self._set_idle(True)
            if self._closed:
                return b""
        return data

    async def _listen_while_held(self) -> bool:
        """Read the connection while a hot request is held (a long-poll): True once the client has
        gone; what it sends meanwhile (a pipelined request) is kept, up to a head's limit, for after
        the answer, and reading stops there."""
        while len(self._held_extra) < MAX_HEAD_BYTES:
            try:
                data = await self._stream.receive_some(MAX_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
            if not data:
                return True
            self._held_extra += data
        await trio.sleep_forever()
        return False

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            await self._write(event.data)
        elif isinstance(event, Closed):
            await self._close()
            await self._protocol.handle(Closed())
        elif isinstance(event, Updated):
            self._set_idle(event.idle)

    def _set_idle(self, idle: bool) -> None:
        self._idle = idle
        if self._closed:
            return
        if idle and self._context.terminated.is_set():
            self._set_read_deadline(-inf)
        else:
            self._set_read_deadline(trio.current_time() + self._config.keep_alive_timeout if idle else inf)

    def _set_read_deadline(self, deadline: float) -> None:
        self._read_deadline = deadline
        if self._read_scope is not None:
            self._read_scope.deadline = deadline

    async def _write(self, data: bytes) -> None:
        if self._closed:
            return  # the client is gone or the answer was cut: nothing more to say
        async with self._send_lock:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_SLICE_BYTES):
                if self._closed:
                    return
                with trio.move_on_after(WRITE_STALL_S) as stall:
                    try:
                        await self._stream.send_all(view[start : start + WRITE_SLICE_BYTES])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._note_vanished("went away while its answer was written")
                        self._drop()
                        return
                if stall.cancelled_caught:
                    self._counters.stalled += 1
                    log.debug("%r: took nothing for %.0f s; cut", self, WRITE_STALL_S)
                    self._drop()
                    return

    async def _close(self) -> None:
        """Our end of the exchange is over: send end-of-stream, then drain briefly (`LINGER_S`).

        Called from the app's own send path, which may already be cancelled (Quart-Trio cancels its
        request scope once the answer is out), so nothing here may stop at a checkpoint half-way."""
        if self._closed:
            return
        self._set_read_deadline(min(self._read_deadline, trio.current_time() + LINGER_S))
        if self._send_lock.locked():  # another task is mid-write: its answer is cut, not raced
            self._drop()
            return
        self._closed = True
        # shutdown(SHUT_WR) never blocks; the shield only keeps its checkpoint from being skipped.
        with trio.CancelScope(shield=True), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.send_eof()

    def _drop(self) -> None:
        """Close the socket now; the reader wakes with ClosedResourceError and tells the app."""
        self._closed = True
        self._stream.socket.close()

    def _note_vanished(self, how: str) -> None:
        self._counters.vanished += 1
        log.debug("%r: the client %s", self, how)


class ConnectionSlots:
    """The live connections, so that shutdown can close the idle ones, and a cap on how many."""

    def __init__(self, limit: int) -> None:
        self.limiter = trio.CapacityLimiter(limit)
        self.live: set[Connection] = set()


async def _serve_connection(
    stream: trio.SocketStream,
    slot: object,
    *,
    app: Any,
    config: HypercornConfig,
    context: WorkerContext,
    state: ConnectionState,
    counters: ConnectionCounters,
    slots: ConnectionSlots,
    hot: HotPath | None,
) -> None:
    connection = Connection(stream, app, config, context, state, counters, hot)
    slots.live.add(connection)
    counters.open_connections += 1
    try:
        await connection.run()
    except* Exception as failure:
        # The containment policy: whatever one connection raises ends that connection only.
        counters.failed += 1
        log.warning("%r: failed while serving; connection closed", connection, exc_info=failure)
    finally:
        counters.open_connections -= 1
        slots.live.discard(connection)
        slots.limiter.release_on_behalf_of(slot)
        await stream.aclose()


async def _accept_forever(
    listening: socket.socket,
    handlers: trio.Nursery,
    serve_one: Callable[[trio.SocketStream, object], Awaitable[None]],
    slots: ConnectionSlots,
    counters: ConnectionCounters,
) -> None:
    """Accept every connection waiting, up to ACCEPT_BATCH, each time the listening socket is ready.

    trio's `SocketListener.accept` takes one connection per pass of the scheduler, and a pass runs
    every ready task once: under load a pass takes tens of milliseconds, and at twice the long-poll
    capacity, with members reconnecting after their timeouts, 1,500 connections waited in the
    backlog and a new one (a `/ping`) for 27 s (bench/RESULTS-capacity.md)."""
    short_of_descriptors = False
    while True:
        await trio.lowlevel.wait_readable(listening)
        for _ in range(ACCEPT_BATCH):
            slot = object()  # held by the connection accepted with it, released when it ends
            try:
                slots.limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                await slots.limiter.acquire_on_behalf_of(slot)
            try:
                accepted, _ = listening.accept()
            except BlockingIOError:
                slots.limiter.release_on_behalf_of(slot)
                break
            except OSError as exc:
                slots.limiter.release_on_behalf_of(slot)
                if exc.errno in _IGNORABLE_ACCEPT_ERRNOS:
                    continue  # that connection was gone before it was taken
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                counters.accept_errors += 1
                if not short_of_descriptors:
                    log.warning(
                        "cannot accept connections: %s (%d open); new members wait until some close",
                        errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        counters.open_connections,
                    )
                    short_of_descriptors = True
                await trio.sleep(ACCEPT_RETRY_S)
                break
            if short_of_descriptors:
                log.warning("accepting connections again (%d open)", counters.open_connections)
                short_of_descriptors = False
            counters.accepted += 1
            handlers.start_soon(serve_one, trio.SocketStream(trio.socket.from_stdlib_socket(accepted)), slot)


async def serve(
    app: Any,
    config: HypercornConfig,
    counters: ConnectionCounters,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    hot: HotPath | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `config.bind` until `shutdown_trigger` returns, then drain within
    `config.graceful_timeout` and cut whatever is still open. With `hot`, the hot read paths are
    answered at the request boundary (relay.http.hotpath)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    slots = ConnectionSlots(counters.max_connections)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        try:
            sockets = config.create_sockets().insecure_sockets
        except OSError as exc:
            raise CannotListen(f"cannot listen on {', '.join(config.bind)}: {exc.strerror or exc}") from exc
        try:
            for sock in sockets:
                sock.listen(config.backlog)
                sock.setblocking(False)  # `_accept_forever` takes what is waiting, until BlockingIOError
            urls = [f"http://{repr_socket_addr(sock.family, sock.getsockname())}" for sock in sockets]
            serve_one = partial(
                _serve_connection,
                app=wrapped,
                config=config,
                context=context,
                # One for all connections, as hypercorn's worker has it: each request's scope copies it.
                state=ConnectionState(lifespan_state.copy()),
                counters=counters,
                slots=slots,
                hot=hot,
            )
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for sock in sockets:
                        acceptors.start_soon(_accept_forever, sock, connections, serve_one, slots, counters)
                    task_status.started(urls)
                    await shutdown_trigger()
                    acceptors.cancel_scope.cancel()
                for sock in sockets:  # no new connections while the open ones drain
                    sock.close()
                await context.terminated.set()
                for connection in list(slots.live):
                    connection.stop_if_idle()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        finally:
            for sock in sockets:
                sock.close()
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


def hypercorn_config(config: Config) -> HypercornConfig:
    server = HypercornConfig()
    host = config.server.host
    server.bind = [f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"]
    server.graceful_timeout = GRACEFUL_TIMEOUT_S
    server.backlog = LISTEN_BACKLOG
    # Set deliberately rather than inherited: an idle connection is closed after KEEP_ALIVE_S, and
    # hypercorn counts a connection idle until a whole request head has arrived, so this also cuts a
    # head trickled byte by byte (slowloris) and a socket that never sends one. Heads are capped at
    # MAX_HEAD_BYTES. There is no read timeout: a held long-poll or an SSE stream legitimately sends
    # nothing for minutes.
    server.keep_alive_timeout = KEEP_ALIVE_S
    server.h11_max_incomplete_size = MAX_HEAD_BYTES
    server.read_timeout = None
    server.accesslog = None
    # A Logger (not a path) makes hypercorn log through the relay's logging set-up, once.
    server.errorlog = logging.getLogger("hypercorn.error")
    return server
