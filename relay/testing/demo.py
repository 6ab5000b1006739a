"""`relay demo`: the real relay against the built-in fake Supabase, with realistic war-call traffic."""

from __future__ import annotations

import functools
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from relay.config import load_config
from relay.service import run_relay
from relay.testing.fake_supabase import FakeSupabase
from relay.testing.war_traffic import generate_war_traffic

DEMO_KEY = "demo-anon-key"


async def run_demo(*, port: int, factions: Sequence[int], changes_per_s: float) -> None:
    fake = FakeSupabase(valid_keys=(DEMO_KEY,))
    traffic = functools.partial(
        generate_war_traffic, fake, factions, changes_per_s=changes_per_s, rng=random.Random()
    )
    with tempfile.TemporaryDirectory(prefix="cat-relay-demo-") as data_dir:
        async with trio.open_nursery() as upstream_side:
            await upstream_side.start(fake.run)
            config = load_config(
                None,
                overrides={
                    "RELAY_UPSTREAM_URL": fake.url,
                    "RELAY_UPSTREAM_ANON_KEY": DEMO_KEY,
                    "RELAY_STORAGE_PATH": str(Path(data_dir) / "relay.db"),
                    "RELAY_SERVER_PORT": str(port),
                },
            )
            # The relay's own nursery ends only when run_relay has drained and closed after Ctrl-C;
            # the fake server and its traffic are stopped after that, never before.
            async with trio.open_nursery() as relay_side:
                relay = await relay_side.start(functools.partial(run_relay, config, handle_signals=True))
                for faction_id in factions:
                    await relay.factions.subscribe(faction_id)
                upstream_side.start_soon(traffic)
                print(_banner(relay.url, factions, fake.url, data_dir), flush=True)
            upstream_side.cancel_scope.cancel()


def _banner(url: str, factions: Sequence[int], upstream: str, data_dir: str) -> str:
    first = factions[0]
    return "\n".join(
        [
            "",
            f"CAT Relay demo: {url}  (fake Supabase at {upstream}, database in {data_dir})",
            f"factions with live war traffic: {', '.join(map(str, factions))}; Ctrl-C stops",
            "",
            f"  curl -s {url}/ping",
            f"  curl -s {url}/status",
            f"  curl -s '{url}/events?faction_id={first}&since=0'",
            f"  curl -s -X POST {url}/subscribe -H 'Content-Type: application/json' \\",
            f'       -d \'{{"faction_id": 12345, "api_key": "{DEMO_KEY}"}}\'',
            "",
        ]
    )
