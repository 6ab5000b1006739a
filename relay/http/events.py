"""`GET /events` and `GET /events/stream` answered straight on ASGI, in front of the Quart app.

Every member's browser asks these two far more often than anything else, so they skip Quart's
per-request machinery (request and response objects, context variables, before/after hooks, error
handler lookup). Measured by `make bench`: see bench/RESULTS.md. Every other path and method falls
through to the Quart app unchanged. The contract is the same as any route's: the same parsers, the
same admission (`relay.http.admission`), the same error renderer (`relay.http.responses`), CORS on every
answer. Its answers are counted here, not by a layer around it: see `relay.http.edge` for why.

A held long-poll or stream ends when its client goes away: hypercorn reports that only as an
`http.disconnect` from `receive()` and does not cancel the handler, so a held request watches for it
(`relay.http.asgi.until_hung_up`, a nursery per held request, deliberately).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import trio

from relay.http.admission import apply_client_clock, check_rate
from relay.http.answers import AnswerCache
from relay.http.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    client_address,
    header,
    send_whole,
    until_hung_up,
)
from relay.http.delivery import next_poll_ms, stream_events, wait_for_events
from relay.http.inputs import parse_faction_id, parse_since, parse_wait
from relay.http.responses import (
    CORS_HEADERS,
    JSON_HEADERS,
    PREFLIGHT_HEADERS,
    ApiError,
    Refusal,
    asgi_headers,
    refusal,
)
from relay.http.stats import LONG_POLL_ROUTE, PollKind, PollOutcome
from relay.http.turns import TURN_EXTENSION

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services

log = logging.getLogger(__name__)

EVENTS_PATH = "/events"
STREAM_PATH = "/events/stream"
STREAM_RETRY_AFTER_S = "30"
TOO_MANY_STREAMS = Refusal(
    503,
    "too_many_streams",
    "this relay holds as many streams as it can; poll /events instead",
    {"Retry-After": STREAM_RETRY_AFTER_S},
)

_CORS = asgi_headers(CORS_HEADERS)
_SSE = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    *_CORS,
]
_PREFLIGHT = [*_CORS, *asgi_headers(PREFLIGHT_HEADERS)]
_METHOD_NOT_ALLOWED = {
    EVENTS_PATH: Refusal(
        405, "method_not_allowed", "this path answers GET and POST only", {"Allow": "GET, POST, OPTIONS"}
    ),
    STREAM_PATH: Refusal(405, "method_not_allowed", "this path answers GET only", {"Allow": "GET, OPTIONS"}),
}


class EventsEndpoint:
    """An ASGI app: the two events paths here, each answer counted here too; everything else to
    `fallback` (the Quart app, behind its own accounting layer: see relay.http.edge for why)."""

    def __init__(self, services: Services, answers: AnswerCache, fallback: ASGIApp) -> None:
        self._services = services
        self._answers = answers
        self._fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._fallback(scope, receive, send)
            return
        started = trio.current_time()
        path, method = scope["path"], scope["method"]
        if path in (EVENTS_PATH, STREAM_PATH) and method == "GET":
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
            await send_whole(send, 200, _PREFLIGHT, b"")
            self._services.http.answered(method, path, 200, trio.current_time() - started)
            return
        if path == STREAM_PATH or (path == EVENTS_PATH and method != "POST"):
            # Publishing (POST /events) is the Quart app's, whose own 405 would leave GET out of Allow.
            status = await _refuse(send, _METHOD_NOT_ALLOWED[path])
            self._services.http.answered(method, path, status, trio.current_time() - started)
            return
        await self._fallback(scope, receive, send)

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
        except Exception as exc:  # the one renderer's: every refusal and fault, as the Quart routes'
            return await _refuse(send, refusal(exc, "GET", path, log))

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
        address = client_address(scope)
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
        found, cursor = await store.read_since(faction_id, since)
        kind = PollKind.LONG_POLL if wait_s > 0 else PollKind.POLL
        if not found and wait_s > 0 and not hub.stopping.is_set():
            with held.long_poll() as may_hold:
                if may_hold:
                    waiting = wait_for_events(
                        store, hub, faction_id, since, linger_s=limits.long_poll_linger_s
                    )
                    turn = scope.get("extensions", {}).get(TURN_EXTENSION)
                    async with turn.paused() if turn is not None else nullcontext():
                        hung_up = await until_hung_up(receive, waiting, deadline=trio.current_time() + wait_s)
                    if hung_up:
                        services.http.polled(kind, PollOutcome.HUNG_UP)
                        return  # nobody is left to answer
                    found, cursor = await store.read_since(faction_id, since)
        # After the wait, with the read: what was trimmed, or lost upstream (a flood), meanwhile counts.
        truncated = store.missed_since(faction_id, since)
        advice = next_poll_ms(store, held, faction_id)
        headers, body = self._answers.poll(faction_id, found, cursor, advice, truncated=truncated)
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
        resume = header(scope, b"last-event-id") or None
        faction_id, since, _ = await self._admit(scope, args, None, resume)
        del args, resume  # this frame lives as long as the stream: hours, thousands of times over

        async def send_chunk(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        with held.stream() as may_hold:
            if not may_hold:
                raise ApiError.of(TOO_MANY_STREAMS)
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            services.http.stream_opened()
            address = client_address(scope)
            services.traffic.stream_opened(faction_id, address, trio.current_time())
            try:
                streaming = stream_events(
                    store, hub, self._answers, services.traffic, faction_id, since, send_chunk
                )
                if not await until_hung_up(receive, streaming):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                services.traffic.stream_closed(faction_id, address)


async def _refuse(send: Send, refused: Refusal) -> int:
    await send_whole(send, refused.status, [*JSON_HEADERS, *asgi_headers(refused.headers)], refused.body)
    return refused.status


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
