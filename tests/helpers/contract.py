"""The HTTP-contract tier's relay: the app and services `run_relay` would serve, built the same way
(`build_services`) on a real store, and never started: no HTTP server, no upstream socket, no
supervisor task. Quart's test client drives it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from relay.config import Config, load_config
from relay.http.api import create_app
from relay.service import BuiltRelay, build_services, open_configured_store
from tests.helpers.factions import ANON_KEY

# Never dialled: the supervisors are not run in this tier.
UNUSED_UPSTREAM = "ws://127.0.0.1:9/realtime/v1/websocket"


def contract_config(data_dir: Path, toml: str = "") -> Config:
    config_file = data_dir / "relay.toml"
    config_file.write_text(toml)
    env = {
        "RELAY_UPSTREAM_URL": UNUSED_UPSTREAM,
        "RELAY_UPSTREAM_ANON_KEY": ANON_KEY,
        "RELAY_STORAGE_PATH": str(data_dir / "data" / "relay.db"),
    }
    return load_config(config_file, environ={}, overrides=env)


@asynccontextmanager
async def open_relay_app(config: Config) -> AsyncIterator[BuiltRelay]:
    async with open_configured_store(config) as store, httpx.AsyncClient() as rest_client:
        services = build_services(config, store=store, rest_client=rest_client)
        yield BuiltRelay(create_app(services), services)
