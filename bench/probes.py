"""Two probes that say whether a latency figure belongs to the relay or to the benchmark itself.

- loop lag: how late this process's trio loop wakes a 10 ms sleep. A busy load generator stamps
  arrivals late, which would be charged to the relay.
- ping: round trips of `GET /ping` on one keep-alive connection, a few per second: how long the
  relay's own loop takes to answer anything at all while it is under load.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import trio

from bench.clients import CLIENT_ERRORS, Connection, Target, request

LOOP_TICK_S = 0.01
PING_EVERY_S = 0.2
PING_TIMEOUT_S = 30.0


@dataclass
class Probes:
    loop_lag_s: list[float] = field(default_factory=list)
    ping_rtt_s: list[float] = field(default_factory=list)
    ping_failures: int = 0
    own_full_collections: int = 0

    async def watch_loop(self, duration_s: float) -> None:
        full_before = gc.get_stats()[2]["collections"]
        try:
            for _ in range(int(duration_s / LOOP_TICK_S)):
                due = trio.current_time() + LOOP_TICK_S
                await trio.sleep_until(due)
                self.loop_lag_s.append(trio.current_time() - due)
        finally:
            self.own_full_collections = gc.get_stats()[2]["collections"] - full_before

    async def ping(self, target: Target, duration_s: float) -> None:
        deadline = trio.current_time() + duration_s
        message = request(target, "/ping")
        connection: Connection | None = None
        try:
            for _ in range(int(duration_s / PING_EVERY_S)):
                if trio.current_time() >= deadline:
                    return
                try:
                    with trio.fail_after(PING_TIMEOUT_S):
                        if connection is None:
                            connection = Connection(await trio.open_tcp_stream(target.host, target.port))
                        sent = time.monotonic()
                        await connection.stream.send_all(message)
                        await connection.read_body(await connection.read_head())
                    self.ping_rtt_s.append(time.monotonic() - sent)
                except CLIENT_ERRORS:
                    self.ping_failures += 1
                    if connection is not None:
                        await trio.aclose_forcefully(connection.stream)
                        connection = None
                await trio.sleep(PING_EVERY_S)
        finally:
            if connection is not None:
                await trio.aclose_forcefully(connection.stream)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]
