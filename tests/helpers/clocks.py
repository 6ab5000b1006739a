"""Clocks a test controls, for a relay built on them: the wall clock (stamps, what /status shows) and
the monotonic clock (every duration). `elapse` is time passing; setting `now_ms` alone is a step of
the wall clock (NTP, an operator's `date -s`), which the monotonic clock never sees."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from relay.http.api import create_app
from relay.service import BuiltRelay, build_services
from relay.storage.store import open_store
from tests.helpers.contract import contract_config

START_MS = 1_732_460_000_000
DAY_MS = 86_400_000


class Clocks:
    """Called, the wall clock in ms; `monotonic_s`, the monotonic clock in seconds."""

    def __init__(self, now_ms: int = START_MS) -> None:
        self.now_ms = now_ms
        self.monotonic = 1_000.0

    def __call__(self) -> int:
        return self.now_ms

    def monotonic_s(self) -> float:
        return self.monotonic

    def elapse(self, ms: int) -> None:
        self.now_ms += ms
        self.monotonic += ms / 1000


@asynccontextmanager
async def open_clocked_relay(data_dir: Path, clocks: Clocks, toml: str = "") -> AsyncIterator[BuiltRelay]:
    """The contract tier's relay (`tests.helpers.contract`), on `clocks`."""
    await trio.Path(data_dir).mkdir(parents=True, exist_ok=True)
    config = contract_config(data_dir, toml)
    async with (
        open_store(
            config.storage.path,
            retention=config.retention,
            now_ms=clocks,
            monotonic_s=clocks.monotonic_s,
            key_columns=config.upstream.key_columns,
        ) as store,
        httpx.AsyncClient() as rest_client,
    ):
        services = build_services(config, store=store, rest_client=rest_client, wall_clock_ms=clocks)
        yield BuiltRelay(create_app(services), services)
