"""`GET /events` and `GET /events/stream` answered straight on ASGI, in front of the Quart app.

Every member's browser asks these two far more often than anything else, so they skip Quart's
per-request machinery (request and response objects, context variables, before/after hooks, error
handler lookup). Measured by `make bench`: see bench/RESULTS.md. Every other path and method falls
through to the Quart app unchanged. The contract is the same as any route's: the same parsers, the
same admission (`relay.admission`), the same error shape, CORS on every answer.

Behind a reverse proxy (`server.trusted_proxies`) every request arrives from the proxy's address, so
the client's own address is taken from the X-Forwarded-For the proxy appended, here, once, for both
this endpoint and the Quart app (whose `request.remote_addr` reads the same scope).

A held long-poll or stream ends when its client goes away: hypercorn reports that only as an
`http.disconnect` from `receive()` and does not cancel the handler, so a held request watches for it.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio

from relay.admission import apply_client_clock, check_rate
from relay.delivery import next_poll_ms, stream_events, wait_for_events
from relay.http_stats import LONG_POLL_ROUTE, OTHER_ROUTE, PollKind, PollOutcome
from relay.inputs import ApiError, parse_faction_id, parse_since, parse_wait
from relay.responses import CORS_HEADERS, JSON_TYPE, PREFLIGHT_HEADERS, asgi_headers, error_body
from relay.store import StoreError

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EVENTS_PATH = "/events"
STREAM_PATH = "/events/stream"
STREAM_RETRY_AFTER_S = "30"
UNKNOWN_ADDRESS = "unknown"  # a client ASGI could not name (a Unix socket): one bucket, one member

_CORS = asgi_headers(CORS_HEADERS)
_JSON = [(b"content-type", JSON_TYPE.encode()), *_CORS]
EVENTS_HEADERS = _JSON  # an answer's, before its content-length
_SSE = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    *_CORS,
]
_PREFLIGHT = [*_CORS, *asgi_headers(PREFLIGHT_HEADERS)]


class EventsEndpoint:
    """An ASGI app: the two events paths here, everything else to `fallback`."""

    def __init__(self, services: Services, fallback: ASGIApp, fallback_routes: Iterable[str]) -> None:
        self._services = services
        self._fallback = fallback
        # The paths the fallback serves, by which its answers are counted (anything else: "other").
        self._fallback_routes = frozenset(fallback_routes)
        self._trusted_proxies = frozenset(services.config.server.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._fallback(scope, receive, send)
            return
        if self._trusted_proxies:  # without a proxy configured, the hot path pays one truth test
            _use_forwarded_client(scope, self._trusted_proxies)
        started = trio.current_time()
        path, method = scope["path"], scope["method"]
        if path in (EVENTS_PATH, STREAM_PATH) and method == "GET":
            # Handled here rather than in a wrapper: every frame stays alive for as long as a
            # long-poll or a stream is held, and there are thousands of them.
            args = _query(scope)
            status = await self._answer_events(path, args, scope, receive, send)
            if path == EVENTS_PATH:
                long_poll = _asks_to_wait(args)
                route = LONG_POLL_ROUTE if long_poll else EVENTS_PATH
                self._services.http.answered(method, route, status, trio.current_time() - started)
                if status >= 400:
                    kind = PollKind.LONG_POLL if long_poll else PollKind.POLL
                    failed = PollOutcome.FAILED if status >= 500 else PollOutcome.REFUSED
                    self._services.http.polled(kind, failed)
            else:
                self._services.http.answered(method, STREAM_PATH, status, None)
            return
        if path in (EVENTS_PATH, STREAM_PATH) and method == "OPTIONS":
            await _send_whole(send, 200, _PREFLIGHT, b"")
            self._services.http.answered(method, path, 200, trio.current_time() - started)
            return
        if path == STREAM_PATH or (path == EVENTS_PATH and method != "POST"):
            # Publishing (POST /events) is the Quart app's, whose own 405 would leave GET out of Allow.
            allow, answers = (
                (b"GET, OPTIONS", "GET") if path == STREAM_PATH else (b"GET, POST, OPTIONS", "GET and POST")
            )
            body = error_body("method_not_allowed", f"this path answers {answers} only")
            await _send_whole(send, 405, [*_JSON, (b"allow", allow)], body)
            self._services.http.answered(method, path, 405, trio.current_time() - started)
            return
        status = 500  # unless the fallback says otherwise

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._fallback(scope, receive, send_counting)
        finally:
            route = path if path in self._fallback_routes or path == EVENTS_PATH else OTHER_ROUTE
            self._services.http.answered(method, route, status, trio.current_time() - started)

    async def _answer_events(
        self, path: str, args: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> int:
        """Answer a GET of either events path; returns the status answered (200 for a stream)."""
        try:
            if path == EVENTS_PATH:
                await self._poll(args, scope, receive, send)
            else:
                await self._stream(args, scope, receive, send)
            return 200
        except ApiError as exc:
            headers = [*_JSON, *asgi_headers(exc.headers)]
            await _send_whole(send, exc.status, headers, error_body(exc.code, exc.message))
            return exc.status
        except StoreError as exc:
            log.error("storage fault while answering GET %s: %s", path, exc)
            body = error_body("storage_unavailable", "the relay's storage is not available right now")
            await _send_whole(send, 503, _JSON, body)
            return 503
        except Exception:
            log.exception("unexpected error answering GET %s", path)
            body = error_body("internal_error", "the relay failed to answer this request")
            await _send_whole(send, 500, _JSON, body)
            return 500

    async def _admit(
        self,
        scope: Scope,
        args: dict[str, str],
        wait_text: str | None,
        resume_text: str | None = None,
    ) -> tuple[int, int | None, float]:
        """What both paths check first, in the order the Quart routes do: the address's rate, the
        parameters, the faction (revived if it had expired), the client's clock. A stream's resume
        point (`resume_text`) wins over `since`, which is checked all the same."""
        services = self._services
        address = _client_address(scope)
        check_rate(services, address)
        faction_id = parse_faction_id(args.get("faction_id"))
        since = parse_since(args.get("since"))
        if resume_text is not None:
            since = parse_since(resume_text)
        wait_s = parse_wait(wait_text, services.config.limits.long_poll_max_wait_s)
        await services.factions.admit(faction_id)
        await apply_client_clock(services, since)
        services.traffic.seen(faction_id, address, trio.current_time())
        return faction_id, since, wait_s

    async def _poll(self, args: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
        services = self._services
        store, hub, held, limits = services.store, services.hub, services.held, services.config.limits
        faction_id, since, wait_s = await self._admit(scope, args, args.get("wait"))
        truncated = store.missed_since(faction_id, since)
        found, cursor = store.read_since(faction_id, since)
        kind = PollKind.LONG_POLL if wait_s > 0 else PollKind.POLL
        if not found and wait_s > 0 and not hub.stopping.is_set():
            with held.long_poll() as may_hold:
                if may_hold:
                    waiting = wait_for_events(
                        store, hub, faction_id, since, linger_s=limits.long_poll_linger_s
                    )
                    if await _until_hung_up(receive, waiting, deadline=trio.current_time() + wait_s):
                        services.http.polled(kind, PollOutcome.HUNG_UP)
                        return  # nobody is left to answer
                    found, cursor = store.read_since(faction_id, since)
        advice = next_poll_ms(store, held, faction_id, services.wall_clock_ms())
        headers, body = services.answers.poll(faction_id, found, cursor, advice, truncated=truncated)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        if found:
            services.traffic.served(faction_id, len(found), trio.current_time())
        services.http.polled(kind, PollOutcome.EVENTS if found else PollOutcome.EMPTY)

    async def _stream(self, args: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
        services = self._services
        store, hub, held = services.store, services.hub, services.held
        # An EventSource reconnecting sends the id of the last event it received; it never sends an
        # empty one, so an empty header is no resume point.
        resume = _header(scope, b"last-event-id") or None
        faction_id, since, _ = await self._admit(scope, args, None, resume)
        del args, resume  # this frame lives as long as the stream: hours, thousands of times over
        if not held.try_open_stream():
            raise ApiError(
                503,
                "too_many_streams",
                "this relay holds as many streams as it can; poll /events instead",
                {"Retry-After": STREAM_RETRY_AFTER_S},
            )

        async def send_chunk(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        except BaseException:
            held.stream_closed()
            raise
        services.http.stream_opened()
        address = _client_address(scope)
        services.traffic.stream_opened(faction_id, address, trio.current_time())
        try:
            streaming = stream_events(
                store, hub, held, services.answers, services.traffic, faction_id, since, send_chunk
            )
            if not await _until_hung_up(receive, streaming):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            services.traffic.stream_closed(faction_id, address)


async def _until_hung_up(
    receive: Receive, held: Coroutine[Any, Any, object], *, deadline: float = math.inf
) -> bool:
    """Run `held` until it ends, the trio clock reaches `deadline`, or the client hangs up (True).

    Hypercorn reports a hang-up only to `receive()` and does not cancel the handler, so a second
    task watches it. The nursery's own scope is the deadline: a held request's memory is mostly its
    tasks and scopes, and there are thousands of them.
    """
    hung_up = Disconnect()
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = deadline
        nursery.start_soon(_watch_for_hang_up, receive, hung_up, nursery.cancel_scope)
        await held
        nursery.cancel_scope.cancel()
    return hung_up.happened


class Disconnect:
    """Whether the client went away while a request was held."""

    __slots__ = ("happened",)

    def __init__(self) -> None:
        self.happened = False


async def _watch_for_hang_up(receive: Receive, hung_up: Disconnect, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # a GET's (empty) body
    hung_up.happened = True
    scope.cancel()


def _asks_to_wait(args: dict[str, str]) -> bool:
    """Whether a poll asked to be held (`wait=` above zero), judged from the text alone: also for a
    request refused before its parameters were parsed."""
    wait = args.get("wait", "")
    return wait.strip("0.") != ""


def _query(scope: Scope) -> dict[str, str]:
    """The query's parameters, the first of each name winning (as in Quart's `request.args`)."""
    text = scope["query_string"].decode("latin-1")
    args: dict[str, str] = {}
    if "%" in text or "+" in text:
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="replace")
    else:
        # What every script sends (digits only). With nothing to unquote, parse_qsl's answer is this
        # split, at a fifth of its cost, and a poll's own work is small beside it.
        pairs = [pair.partition("=")[::2] for pair in text.split("&") if pair]
    for name, value in pairs:
        args.setdefault(name, value)
    return args


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else UNKNOWN_ADDRESS


def _use_forwarded_client(scope: Scope, trusted: frozenset[str]) -> None:
    """For a request from a trusted proxy, make the client the rightmost X-Forwarded-For address: the
    one the proxy appended itself (nginx's $proxy_add_x_forwarded_for). Addresses to its left came
    with the request and could be anything; so could the header of a peer that is not trusted."""
    client = scope.get("client")
    if not client or client[0] not in trusted:
        return
    forwarded = None
    for key, value in scope["headers"]:
        if key.lower() == b"x-forwarded-for":
            forwarded = value  # repeated headers are one comma-separated list: the last one ends it
    if forwarded is None:
        return
    try:
        address = ipaddress.ip_address(bytes(forwarded).decode("latin-1").rsplit(",", 1)[-1].strip())
    except ValueError:
        return  # not what the proxy writes: keep the proxy's own address rather than guess
    # The client's port is not forwarded; 0 says so rather than passing off the proxy's as its own.
    scope["client"] = (str(address), 0)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
