"""The floor of our server: a bare ASGI app under hypercorn's trio worker answering every request with
one fixed body, the relay's own empty `/events` answer with the relay's headers, served with exactly
the relay's hypercorn settings (`relay.http.server.hypercorn_config`), so it differs from the relay only
in the app. Prints "listening on <url>" once it accepts connections; SIGTERM or SIGINT stops it.

    python -m bench.peers.floor --port 0
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys

import trio
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPResponseStartEvent, Scope

from relay.config import Config, load_config
from relay.http.responses import CORS_HEADERS, JSON_TYPE, asgi_headers
from relay.http.server import hypercorn_config
from relay.storage.store import wall_clock_ms

# Only to build a relay Config (both are required); the floor never connects anywhere.
UNUSED_UPSTREAM = {
    "RELAY_UPSTREAM_URL": "ws://127.0.0.1:9/realtime/v1/websocket",
    "RELAY_UPSTREAM_ANON_KEY": "unused",
}


def empty_answer(timestamp: int) -> bytes:
    """What the relay answers a poll with nothing new (`relay.http.delivery.events_body` with no events)."""
    return f'{{"events":[],"timestamp":{timestamp},"next_poll_ms":1000}}'.encode()


class FixedAnswer:
    """An ASGI app: the same 200 answer to every HTTP request; lifespan acknowledged."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        # The relay's /events headers in the relay's order (relay.http.events: _JSON, then the length).
        self.start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", JSON_TYPE.encode()),
                *asgi_headers(CORS_HEADERS),
                (b"content-length", str(len(body)).encode()),
            ],
        }

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await send(self.start)
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def relay_config(host: str, port: int) -> Config:
    return load_config(
        environ={}, overrides={**UNUSED_UPSTREAM, "RELAY_SERVER_HOST": host, "RELAY_SERVER_PORT": str(port)}
    )


async def main(host: str, port: int) -> None:
    stopping = trio.Event()
    app = FixedAnswer(empty_answer(wall_clock_ms()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stopping)
        # serve() returns once `stopping` is set and hypercorn has drained (the relay's graceful timeout).
        config = hypercorn_config(relay_config(host, port))
        urls = await nursery.start(functools.partial(serve, app, config, shutdown_trigger=stopping.wait))
        print(f"listening on {urls[0]}", flush=True)


async def _stop_on_signal(stopping: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stopping.set()
            return


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.peers.floor", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        trio.run(main, args.host, args.port)
    except KeyboardInterrupt:
        sys.exit(130)
