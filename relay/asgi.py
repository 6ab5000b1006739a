"""ASGI glue between hypercorn and the Quart-Trio app: what neither does on its own."""

from __future__ import annotations

from typing import Any

import trio

DISCONNECT = {"type": "http.disconnect"}


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
