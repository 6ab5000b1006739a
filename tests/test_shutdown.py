"""`relay serve` stopped with SIGTERM while something would hold it: it exits 0 within SHUTDOWN_BOUND_S.

Issue 13's bound, which deploy/cat-relay.service's TimeoutStopSec is set from (tests/test_deploy.py).
Real processes and the real clock: each bound is a `fail_after` around the wait for the exit status.
"""

from __future__ import annotations

import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import trio

from relay.storage.store import RECONCILE_CHUNK_EVENTS
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.relay_process import SHUTDOWN_BOUND_S, RelayProcess, relay_process
from tests.helpers.userscript import read_status
from tests.helpers.waits import eventually, eventually_async

pytestmark = pytest.mark.e2e

FACTIONS = (FACTION, 11581, 9001, 777, 12345)
# Ten chunks: the reconcile takes seconds to store, so SIGTERM meets it in the middle.
RECONCILE_ROWS = 10 * RECONCILE_CHUNK_EVENTS


async def subscribe(relay: RelayProcess, factions: tuple[int, ...]) -> None:
    """Subscribe `factions` and wait until all are connected (one /status for all of them at a time:
    /status costs ten requests' worth of the rate limit)."""
    async with httpx.AsyncClient(base_url=relay.url) as http:
        for faction_id in factions:
            response = await http.post("/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY})
            assert response.status_code == 200
        states: dict[int, str] = {}

        async def look() -> None:
            states.update(
                (f["faction_id"], f["upstream"]["state"]) for f in (await read_status(http))["factions"]
            )

        await eventually_async(look, lambda: all(states.get(f) == "connected" for f in factions), 0.5)


async def stop(relay: RelayProcess) -> int:
    """SIGTERM, then the exit status, which must come within SHUTDOWN_BOUND_S."""
    relay.process.send_signal(signal.SIGTERM)
    with trio.fail_after(SHUTDOWN_BOUND_S):
        return await relay.process.wait()


def stored(database: Path) -> tuple[int, int]:
    """Events and rows of FACTION in the database, as an operator's sqlite3 shell sees them."""
    with closing(sqlite3.connect(database)) as conn:
        ((events, rows),) = conn.execute(
            "SELECT (SELECT count(*) FROM events WHERE faction_id = ?),"
            " (SELECT count(*) FROM faction_rows WHERE faction_id = ?)",
            (FACTION, FACTION),
        ).fetchall()
    return int(events), int(rows)


async def test_sigterm_with_upstreams_that_never_answer_the_close_exits_within_the_bound(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    with trio.fail_after(60):
        async with relay_process(config, env) as relay:
            await subscribe(relay, FACTIONS)
            fake_upstream.freeze(answer_close=False)
            assert await stop(relay) == 0
            await eventually(lambda: "relay stopped" in relay.text())
    assert "Traceback" not in relay.text()


async def test_sigterm_cuts_a_large_reconcile_and_the_next_start_stores_the_rest(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    """Upstream holds rows the relay never saw (changed while it was down): the reconcile at the next
    start stores them in chunks. SIGTERM once the first chunk is served: the relay stops after the
    chunk being written, what it committed is whole, and the next start's reconcile stores the rest."""
    config, env = serve_config
    database = config.parent / "data" / "relay.db"
    with trio.fail_after(120):
        async with relay_process(config, env) as relay:  # the faction's first read: its baseline
            async with httpx.AsyncClient(base_url=relay.url) as http:
                response = await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
                assert response.status_code == 200
                reconciled: list[int] = []

                async def read_reconciles() -> None:
                    factions = (await read_status(http))["factions"]
                    reconciled[:] = [
                        f["reconcile"]["reconciles"] for f in factions if f["faction_id"] == FACTION
                    ]

                await eventually_async(
                    read_reconciles, lambda: reconciled and reconciled[0] >= 1, pause_s=0.05
                )
            assert await stop(relay) == 0
        for n in range(1, RECONCILE_ROWS + 1):
            row = {"id": n, "faction_id": FACTION, "target_id": 3_000_000 + n, "caller_name": "ann"}
            fake_upstream.insert("war_calls", row, deliver=False)
        async with relay_process(config, env) as relay:
            async with httpx.AsyncClient(base_url=relay.url) as http:
                served: list[object] = []

                async def poll() -> None:
                    served[:] = (await http.get("/events", params={"faction_id": FACTION})).json()["events"]

                await eventually_async(poll, lambda: served, pause_s=0.01)
            assert await stop(relay) == 0
        events, rows = stored(database)
        assert 0 < events < RECONCILE_ROWS  # cut in the middle...
        assert events == rows  # ...with each event's row change in the same transaction
        assert events % RECONCILE_CHUNK_EVENTS == 0  # whole chunks only
        async with relay_process(config, env) as relay:  # the faction is still subscribed
            await eventually(lambda: stored(database) == (RECONCILE_ROWS, RECONCILE_ROWS), step_s=0.2)
            assert await stop(relay) == 0
    assert "Traceback" not in relay.text()


async def test_a_second_sigterm_during_shutdown_stops_it_at_once(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    """A request still arriving holds the first shutdown up to the graceful timeout; a second signal
    does not wait for it."""
    config, env = serve_config
    with trio.fail_after(60):
        async with relay_process(config, env) as relay:
            await subscribe(relay, (FACTION,))
            host, port = relay.url.removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as slow_client:
                await slow_client.send_all(
                    b"POST /subscribe HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100\r\n\r\n{"faction_id":'
                )
                relay.process.send_signal(signal.SIGTERM)
                await eventually(lambda: "SIGTERM received: shutting down" in relay.text())
                relay.process.send_signal(signal.SIGTERM)
                with trio.fail_after(1.0):  # the graceful timeout is 2 s
                    assert await relay.process.wait() == 0
    assert "SIGTERM received again: stopping now" in relay.text()
    assert "Traceback" not in relay.text()


async def test_a_second_sigterm_while_the_store_closes_stops_it_at_once_and_cleanly(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    """An operator's reader in the database holds the final checkpoint (for CLOSE_CHECKPOINT_S); a
    second signal then is the relay's to handle, never its default action, which killed the process
    with -15 in the middle of closing the store."""
    config, env = serve_config
    with trio.fail_after(60):
        async with relay_process(config, env) as relay:
            await subscribe(relay, (FACTION,))
            with closing(sqlite3.connect(config.parent / "data" / "relay.db")) as reader:
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM events").fetchall()  # a read snapshot held open
                relay.process.send_signal(signal.SIGTERM)
                await eventually(lambda: "closing upstream sockets" in relay.text())
                relay.process.send_signal(signal.SIGTERM)
                with trio.fail_after(SHUTDOWN_BOUND_S):
                    assert await relay.process.wait() == 0
    assert "SIGTERM received again: stopping now" in relay.text()
    assert "relay stopped" in relay.text()
    assert "Traceback" not in relay.text()
