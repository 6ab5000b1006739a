"""The HTTP edge: the ASGI layers between hypercorn and the Quart app, each with one job, and the
stack they make (`http_edge`), outermost first:

    ForwardedClient      the client's address from a trusted proxy's X-Forwarded-For (only with
                         `server.trusted_proxies`)
    EventsEndpoint       GET /events and /events/stream, answered and counted (relay.http.events)
    HttpAccounting       counts every other answer by method, route and status, with its latency
    EndAfterResponse     ends a Quart exchange with its response (relay.http.asgi)
    the Quart app

Why it is shaped so: each layer is a coroutine frame on every request's stack, alive for as long as
the request is, and a held long-poll or stream is held for up to hours, thousands at once (a frame
each: ~240 bytes, measured with tracemalloc, against a goal of 25 KB per held client). So nothing
that is not needed sits in front of the events endpoint: without a proxy there is no forwarding
layer at all, and accounting wraps only the Quart app, while the events endpoint counts its own
answers into the same `HttpCounters` (it also knows what no wrapper does: a long-poll from a plain
poll, and how each poll ended).

Behind a reverse proxy every request arrives from the proxy's address, so the client's own address is
rewritten into the scope once, for the events endpoint and the Quart app alike (whose
`request.remote_addr` reads the same scope).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio
from quart_trio import QuartTrio

from relay.http.answers import AnswerCache
from relay.http.asgi import ASGIApp, EndAfterResponse, Message, Receive, Scope, Send
from relay.http.events import EventsEndpoint
from relay.http.stats import OTHER_ROUTE, HttpCounters

if TYPE_CHECKING:  # the composition root builds Services and imports the HTTP side
    from relay.service import Services


def http_edge(services: Services, answers: AnswerCache, app: QuartTrio) -> ASGIApp:
    """The stack in front of the Quart app's own `asgi_app`, once its routes are in place."""
    routes = [rule.rule for rule in app.url_map.iter_rules()]
    quart = HttpAccounting(EndAfterResponse(app.asgi_app), services.http, routes)
    edge: ASGIApp = EventsEndpoint(services, answers, quart)
    trusted = frozenset(services.config.server.trusted_proxies)
    return ForwardedClient(edge, trusted) if trusted else edge


class ForwardedClient:
    """For a request from a trusted proxy, make the client the rightmost X-Forwarded-For address: the
    one the proxy appended itself (nginx's $proxy_add_x_forwarded_for). Addresses to its left came
    with the request and could be anything; so could the header of a peer that is not trusted.

    Trusted by the peer's address, not by a count of hops (as hypercorn's ProxyFixMiddleware does,
    which believes any peer)."""

    def __init__(self, app: ASGIApp, trusted: frozenset[str]) -> None:
        self._app = app
        self._trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            _use_forwarded_client(scope, self._trusted)
        await self._app(scope, receive, send)


def _use_forwarded_client(scope: Scope, trusted: frozenset[str]) -> None:
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


class HttpAccounting:
    """Counts each answer of `app` by method, route and status, with the seconds it took. The route is
    the path when `app` serves it and "other" otherwise, so that scanners cannot grow the metrics."""

    def __init__(self, app: ASGIApp, counters: HttpCounters, routes: Iterable[str]) -> None:
        self._app = app
        self._counters = counters
        self._routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = trio.current_time()
        status = 500  # unless the app says otherwise

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_counting)
        finally:
            path = scope["path"]
            route = path if path in self._routes else OTHER_ROUTE
            self._counters.answered(scope["method"], route, status, trio.current_time() - started)
