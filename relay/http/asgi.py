"""ASGI glue the relay needs and neither hypercorn nor Quart-Trio gives: the ASGI types, whole answers,
headers and the client's address read from a scope, a held request that ends when its client hangs
up, and a Quart exchange that ends with its response.

Two request-path nurseries live here on purpose, against the house habit that handlers open none:
hypercorn reports a hang-up only to `receive()` and never cancels a handler, so `until_hung_up`
watches `receive()` beside the held work, and `EndAfterResponse` races Quart-Trio's pending
`receive()` against the response's end. Neither can be done with a cancel scope alone (see each).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DISCONNECT = {"type": "http.disconnect"}
UNKNOWN_ADDRESS = "unknown"  # a client ASGI could not name (a Unix socket): one bucket, one member


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else UNKNOWN_ADDRESS


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the header `name` (lower case), or None."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def until_hung_up(
    receive: Receive, held: Coroutine[Any, Any, object], *, deadline: float = math.inf
) -> bool:
    """Run `held` until it ends, the trio clock reaches `deadline`, or the client hangs up (True).

    Hypercorn reports a hang-up only to `receive()` and does not cancel the handler, so a second
    task watches it. The nursery's own scope is the deadline: a held request's memory is mostly its
    tasks and scopes, and there are thousands of them.
    """
    hung_up = HangUp()
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = deadline
        nursery.start_soon(_watch_for_hang_up, receive, hung_up, nursery.cancel_scope)
        await held
        nursery.cancel_scope.cancel()
    return hung_up.happened


class HangUp:
    """A flag: whether the client went away while its request was held."""

    __slots__ = ("happened",)

    def __init__(self) -> None:
        self.happened = False


async def _watch_for_hang_up(receive: Receive, hung_up: HangUp, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # a GET's (empty) body
    hung_up.happened = True
    scope.cancel()


class EndAfterResponse:
    """ASGI glue: tell the app the exchange is over once its response is complete.

    Measured with hypercorn 0.18 and Quart-Trio 0.12: a `Connection: close` request was answered but
    its socket left open until the client hung up, so a client reading to end of stream waited
    forever while the relay kept the descriptor. Quart-Trio's message task is still inside
    `receive()` when the response completes; racing that receive against the response's last body
    chunk, and answering `http.disconnect` when the response wins, lets hypercorn close the socket.
    (A bare cancel scope around `receive()` did not: the race in a nursery is what the test pins.)
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        finished = trio.Event()

        async def send_then_mark(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished.set()

        async def receive_until_finished() -> dict[str, Any]:
            if finished.is_set():
                return DISCONNECT
            received: list[dict[str, Any]] = []
            async with trio.open_nursery() as race:
                race.start_soon(_receive_into, receive, received, race.cancel_scope)
                race.start_soon(_cancel_when_set, finished, race.cancel_scope)
            return received[0] if received else DISCONNECT

        await self.app(scope, receive_until_finished, send_then_mark)


async def _receive_into(receive: Any, into: list[dict[str, Any]], scope: trio.CancelScope) -> None:
    into.append(await receive())
    scope.cancel()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
