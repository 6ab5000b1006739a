"""Storage faults on a real `relay serve`: a full disk and a locked database are reported by /health,
polls keep being answered from memory, nothing crashes, and the relay recovers by itself.

The full disk is the kernel's own: RLIMIT_FSIZE set on the relay process makes every database write
fail with EFBIG, as a full quota does. The lock is another connection holding the write lock, as an
operator's `sqlite3` shell in the middle of a transaction does.
"""

from __future__ import annotations

import json
import resource
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, call
from tests.helpers.relay_process import relay_process
from tests.helpers.userscript import Userscript, connected_script, wait_connected, wait_reconciled
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e

REFUSED_PUBLISHES = 20
PUBLISH = {"api_key": ANON_KEY, "faction_id": FACTION, "type": "hospital_update", "data": {"n": 1}}
# Only the soft limit moves: raising a hard limit again would need CAP_SYS_RESOURCE.
FILE_SIZE_HARD_LIMIT = resource.RLIM_INFINITY


async def health(http: httpx.AsyncClient) -> httpx.Response:
    return await http.get("/health", timeout=30)


async def wait_health(http: httpx.AsyncClient, status: int) -> dict[str, str]:
    for _ in range(150):  # bounded: the caller's fail_after is the real limit
        response = await health(http)
        if response.status_code == status:
            body: dict[str, str] = response.json()
            return body
        await trio.sleep(0.2)
    raise AssertionError(f"/health never answered {status}")


async def write_failing(http: httpx.AsyncClient) -> float:
    """`cat_relay_storage_write_failing` as Prometheus would scrape it."""
    families = text_string_to_metric_families((await http.get("/metrics", timeout=30)).text)
    (sample,) = [s for f in families for s in f.samples if s.name == "cat_relay_storage_write_failing"]
    return sample.value


async def test_a_full_disk_is_reported_served_around_and_recovered_from(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    with trio.fail_after(60):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            for n in (1, 2):
                fake_upstream.insert("war_calls", call(FACTION, n))
            await script.poll_until(2)

            resource.prlimit(relay.process.pid, resource.RLIMIT_FSIZE, (1, FILE_SIZE_HARD_LIMIT))
            try:
                unhealthy = await wait_health(http, 503)
                assert unhealthy["code"] == "storage_unavailable"
                assert "write failed" in unhealthy["error"]
                assert await write_failing(http) == 1
                served = await http.get("/events", params={"faction_id": FACTION, "since": 0})
                assert served.status_code == 200
                assert [e["data"]["new"]["id"] for e in served.json()["events"]] == [1, 2]
                fake_upstream.insert("war_calls", call(FACTION, 3))  # cannot be stored now: not half-served
                await eventually(lambda: "DeliveryFailed" in relay.text())
                for _ in range(REFUSED_PUBLISHES):
                    refused = await http.post("/events", json=PUBLISH)
                    assert (refused.status_code, refused.json()["code"]) == (503, "storage_unavailable")
                # One line for the outage however many requests it refuses (it was one ERROR each).
                outage = [line for line in relay.log if " ERROR " in line and "write failed" in line]
                assert len(outage) == 1
            finally:
                resource.prlimit(
                    relay.process.pid, resource.RLIMIT_FSIZE, (FILE_SIZE_HARD_LIMIT, FILE_SIZE_HARD_LIMIT)
                )

            assert (await wait_health(http, 200)) == {"status": "ok"}
            await eventually(lambda: "writes work again after" in relay.text())
            assert await write_failing(http) == 0
            await wait_connected(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 4))
            await script.poll_until(4)
            assert relay.process.returncode is None
    # The reconcile after the reconnect heals the change the full disk lost, as a resync INSERT.
    received = {m["payload"]["new"]["id"]: m["payload"] for m in script.messages}
    assert sorted(received) == [1, 2, 3, 4]
    assert len(script.messages) == 4
    assert received[3].get("resync") is True
    assert "resync" not in received[4]
    assert "Traceback" not in relay.text()


async def test_a_locked_database_is_reported_and_recovered_from(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    config, env = serve_config
    with trio.fail_after(60):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            operator_shell = sqlite3.connect(config.parent / "data" / "relay.db", isolation_level=None)
            try:
                operator_shell.execute("BEGIN IMMEDIATE")  # holds the write lock until rolled back
                unhealthy = await wait_health(http, 503)
                assert "locked" in unhealthy["error"]
                assert (await http.get("/ping")).status_code == 200
                operator_shell.execute("ROLLBACK")
            finally:
                operator_shell.close()
            assert (await wait_health(http, 200)) == {"status": "ok"}
            fake_upstream.insert("war_calls", call(FACTION, 1))
            await script.poll_until(1)


async def chattr(flag: str, *paths: Path) -> None:
    await trio.run_process(["chattr", flag, *map(str, paths)])


async def test_a_read_only_database_file_is_reported_and_recovered_from(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    """Immutable files (chattr +i) refuse writes even to root, unlike file permissions."""
    config, env = serve_config
    database = config.parent / "data" / "relay.db"
    files = (database, database.with_name("relay.db-wal"))
    with trio.fail_after(60):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 1))
            await script.poll_until(1)
            await chattr("+i", *files)
            try:
                unhealthy = await wait_health(http, 503)
                assert "write failed" in unhealthy["error"]
                served = await http.get("/events", params={"faction_id": FACTION, "since": 0})
                assert [e["data"]["new"]["id"] for e in served.json()["events"]] == [1]
            finally:
                await chattr("-i", *files)
            assert (await wait_health(http, 200)) == {"status": "ok"}
            fake_upstream.insert("war_calls", call(FACTION, 2))
            await script.poll_until(2)
    assert "Traceback" not in relay.text()


async def test_poisoned_stored_events_and_rows_are_quarantined_and_the_rest_served(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    """One stored event not UTF-8 stopped the relay from starting (a restart loop under systemd); one
    not JSON made every `/events` answer for its faction invalid JSON while `/health` said ok."""
    config, env = serve_config
    database = config.parent / "data" / "relay.db"
    with trio.fail_after(60):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = await connected_script(http, FACTION)
            for n in (1, 2, 3):
                fake_upstream.insert("war_calls", call(FACTION, n))
            await script.poll_until(3)
        with closing(sqlite3.connect(database, isolation_level=None)) as shell:
            _first, not_utf8, not_json = (i for (i,) in shell.execute("SELECT id FROM events ORDER BY id"))
            shell.execute(f"UPDATE events SET data = CAST(x'fffe' AS TEXT) WHERE id = {not_utf8}")
            shell.execute(f"""UPDATE events SET data = '{{"broken' WHERE id = {not_json}""")
            shell.execute("""UPDATE faction_rows SET row = '{"broken' WHERE row_key = '3'""")

        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            served = await http.get("/events", params={"faction_id": FACTION, "since": 0})
            assert served.status_code == 200
            events = json.loads(served.content)["events"]
            assert [e["data"]["new"]["id"] for e in events][:1] == [1]
            assert {not_utf8, not_json}.isdisjoint(e["id"] for e in events)
            metrics = (await http.get("/metrics")).text
            assert "cat_relay_events_quarantined_total 2.0" in metrics
            assert (await health(http)).status_code == 200
            # The poisoned row is taken as missing when the reconcile reads the faction's rows, and
            # stored again from upstream.
            await wait_reconciled(http, FACTION)
            metrics = (await http.get("/metrics")).text
            assert "cat_relay_faction_rows_quarantined_total 1.0" in metrics
            state = (await http.get("/state", params={"faction_id": FACTION})).json()
            assert sorted(row["id"] for row in state["tables"]["war_calls"]) == [1, 2, 3]
    quarantined = [line for line in relay.log if "quarantined" in line]
    assert len(quarantined) == 3
    assert f"event id={not_utf8} of faction {FACTION}: not UTF-8" in relay.text()
    assert "broken" not in relay.text()
    assert "Traceback" not in relay.text()
