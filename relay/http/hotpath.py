"""The hot read paths answered at the request boundary, before hypercorn's protocol sees them.

A member's poll (`GET /events`, plain or long) and `GET /ping` are most of what the relay is
asked, and each answer is cheap to make: what cost was the request cycle around it. Measured with the
short-poll mix (bench/DESIGNS-hotpath.md): the ASGI path through hypercorn's `H11Protocol` and
`HTTPStream` (h11 parsing and framing, a task and a channel per request, the ASGI messages walked
through hypercorn's state machines, three writes per answer) left the relay at 0.3x the Node relay;
answering the same requests at the protocol level but still through h11 gained 1.8x; parsing the
head with httptools and writing the answer in one piece, without h11, gained 3x.

So, on a connection between requests (hypercorn's protocol idle, h11 idle with nothing buffered),
each whole request head at the front of what was read is looked at here:

- `parse_hot_head`: httptools (Node's llhttp) parses it (h11 where httptools cannot be loaded: the
  pyz run by another Python than it was built with); it is hot only if it is exactly a bodyless
  HTTP/1.1 GET of /events (a long-poll too) or of /ping, with one Host, no body framing, no Expect,
  Upgrade or Connection header, every name and value within h11's own grammar, and the head under
  the relay's head limit. Anything else, and everything after it on the connection until the
  protocol is idle again, goes to hypercorn unchanged: h11 answers what is malformed as before.
- A long-poll is held in the reader's task; meanwhile the connection is read (`listen`), so a client
  that hangs up is seen at once (the app's `receive()` answers `http.disconnect`, as hypercorn's
  would), and a request pipelined behind it is kept for after the answer.
- `HotPath.answer`: the relay's own ASGI app (the whole stack, so the answer, its headers and every
  refusal are the ones the ASGI path gives) is called in the reader's task with the scope hypercorn's
  `HTTPStream` builds from that head, and the answer is framed as hypercorn and h11 frame it: the
  status line without a reason, the app's headers (stripped, as `build_and_validate_headers` does),
  hypercorn's `date` and `server`, the body. That framing is only taken for an answer with a
  Content-Length and a status that has a body; any other answer is framed by a fresh h11 connection
  fed the same head, byte for byte what h11 would have written.

The connection (`relay.http.server.Connection`) does the rest as for any request: idle and busy for
the keep-alive deadline, `keep_alive_requests` and the worker's request count, one write through its
lock and stall bound, containment of any failure. A connection near `keep_alive_max_requests` (whose
last answer says `Connection: close`) is left to hypercorn.

`tests/test_hotpath.py` compares both paths byte for byte over the contract; the hostile-client tests
run with it on (the default). `server.hot_path = false` turns it off.

Written against hypercorn 0.18.0 (`relay.http.server.HYPERCORN_VERSION`), h11 0.16 and httptools
0.6.4; `tests/test_hotpath.py` pins the framing against the h11 path, so a change in either shows.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from time import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11
import trio
from hypercorn.utils import wrap_app

from relay.http.turns import TURN_EXTENSION, Turns

try:
    import httptools
except ImportError:  # the pyz on another Python or platform than it was built on: h11 parses them
    httptools = None

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.typing import ConnectionState

EVENTS_PATH = b"/events"
HOT_PATHS = frozenset({EVENTS_PATH, b"/ping"})
# Request headers after which hypercorn must decide: a body or its framing, an upgrade, an expectation,
# a connection option (h11 answers `Connection: close` in kind).
_LEFT_TO_HYPERCORN = frozenset(
    {b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"connection"}
)
# h11's grammar (RFC 9110 token and field-value; RFC 9112 request-target as h11 reads it).
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}
_NO_BODY_STATUSES = frozenset({204, 304})


# Reads the connection while a request is held: True once the client has gone (end of stream or a
# reset); what else it sends meanwhile (a pipelined request) is kept for after the answer.
Listen = Callable[[], Awaitable[bool]]


class HotHead:
    """A request head as httptools hands it over."""

    __slots__ = ("complete", "headers", "target")

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_message_complete(self) -> None:
        self.complete = True


def parse_hot_head(head: bytes) -> HotHead | None:
    """`head` (a request line and fields up to the blank line) if it is one the hot path answers."""
    parsed = _parsed_by_httptools(head) if httptools is not None else _parsed_by_h11(head)
    if parsed is None:
        return None
    path, _, _ = parsed.target.partition(b"?")
    if path not in HOT_PATHS or not _TARGET.fullmatch(parsed.target):
        return None
    hosts = 0
    for name, value in parsed.headers:
        if name in _LEFT_TO_HYPERCORN or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            return None
        hosts += name == b"host"
    return parsed if hosts == 1 else None


def _parsed_by_httptools(head: bytes) -> HotHead | None:
    parsed = HotHead()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # the latter is no HttpParserError
        return None
    if not parsed.complete or parser.get_method() != b"GET" or parser.get_http_version() != "1.1":
        return None
    return parsed


def _h11_reading(head: bytes) -> tuple[h11.Connection, object, object]:
    """A fresh h11 server connection fed `head`, and the two events it makes of it."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(head)
    return connection, connection.next_event(), connection.next_event()


def _parsed_by_h11(head: bytes) -> HotHead | None:
    """The same head read by h11, where httptools cannot be imported: slower, and the same answers."""
    try:
        _, request, end = _h11_reading(head)
    except h11.RemoteProtocolError:
        return None
    if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
        return None
    if request.method != b"GET" or request.http_version != b"1.1":
        return None
    parsed = HotHead()
    parsed.target, parsed.headers, parsed.complete = request.target, list(request.headers), True
    return parsed


class HotPath:
    """Answers hot heads with the relay's app; `enabled` is looked at for each head."""

    def __init__(self, app: Any, config: HypercornConfig) -> None:
        # Wrapped as `relay.http.server.serve` wraps it; called untyped, with hypercorn's arguments.
        self._app: Any = wrap_app(app, config.wsgi_max_body_size, None)
        self._config = config
        self.enabled = True
        self.answered = 0
        self.turns = Turns()
        self._headers_second = -1
        self._headers: list[tuple[bytes, bytes]] = []

    async def answer(
        self,
        head: HotHead,
        raw_head: bytes,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        state: ConnectionState,
        listen: Listen | None = None,
    ) -> tuple[bytes, bool]:
        """The whole answer to `head`, as bytes to write, and whether the connection closes after it
        (an answer saying `Connection: close`)."""
        path, _, query_string = head.target.partition(b"?")
        scope = {
            "type": "http",
            "http_version": "1.1",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": "GET",
            "scheme": "http",  # TLS is nginx's (relay.http.server)
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query_string,
            "root_path": self._config.root_path,
            "headers": head.headers,
            "client": client,
            "server": server,
            "state": state.copy(),
            "extensions": {},
        }
        exchange = _Exchange(listen)
        # A poll's answer waits its turn (relay.http.turns); /ping never does.
        async with self.turns.turn() if path == EVENTS_PATH else nullcontext() as turn:
            if turn is not None:
                scope["extensions"] = {TURN_EXTENSION: turn}
            await self._app(
                scope, exchange.receive, exchange.send, trio.to_thread.run_sync, trio.from_thread.run
            )
        self.answered += 1
        status, headers, body = exchange.answer()
        headers = [(bytes(name).strip(), bytes(value).strip()) for name, value in headers]
        names = {name.lower() for name, _ in headers}
        if (
            status in _NO_BODY_STATUSES
            or status < 200
            or b"content-length" not in names
            or b"connection" in names
        ):
            return _framed_by_h11(raw_head, status, [*headers, *self._config.response_headers("h11")], body)
        lines = [b"HTTP/1.1 %d \r\n" % status]
        lines.extend(b"%s: %s\r\n" % field for field in headers)
        lines.extend(b"%s: %s\r\n" % field for field in self._server_headers())
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines), False

    def _server_headers(self) -> list[tuple[bytes, bytes]]:
        """hypercorn's own `Config.response_headers("h11")`, made once a second: its `date` changes
        no oftener, and formatting it was a measurable part of every poll."""
        second = int(time())
        if second != self._headers_second:
            self._headers_second, self._headers = second, self._config.response_headers("h11")
        return self._headers


class _Exchange:
    """The app's side of one request answered whole: its request is the empty body, its answer is
    gathered. A second receive waits, as hypercorn's inbox does until the client goes."""

    def __init__(self, listen: Listen | None = None) -> None:
        self._listen = listen
        self._asked = False
        self._start: dict[str, Any] | None = None
        self._body: list[bytes] = []
        self._done = False

    async def receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return _REQUEST
        if self._listen is not None and await self._listen():
            return {"type": "http.disconnect"}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and self._start is None:
            self._start = message
        elif message["type"] == "http.response.body" and self._start is not None and not self._done:
            self._body.append(bytes(message.get("body", b"")))
            self._done = not message.get("more_body", False)

    def answer(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if self._start is None:  # hypercorn's answer to an app that returned without one
            return 500, [(b"content-length", b"0"), (b"connection", b"close")], b""
        return int(self._start["status"]), list(self._start.get("headers", [])), b"".join(self._body)


def _framed_by_h11(
    raw_head: bytes, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[bytes, bool]:
    """What h11 writes for this answer to this head, and whether it closes the connection after: the
    rare answers the fast framing does not take (no Content-Length, no body, `Connection: close`)."""
    connection, _, _ = _h11_reading(raw_head)  # the request and its end, taken before answering
    pieces = [connection.send(h11.Response(status_code=status, headers=headers))]
    if body:
        pieces.append(connection.send(h11.Data(data=body)))
    pieces.append(connection.send(h11.EndOfMessage()))
    return b"".join(piece for piece in pieces if piece), connection.our_state is not h11.DONE
