"""Today's userscript, played by httpx, against hypercorn on a real port and the fake upstream."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from relay.service import RunningRelay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import FACTION, OTHER_FACTION, call
from tests.helpers.relay_process import relay_process
from tests.helpers.userscript import Userscript, connected_script, wait_connected
from tests.helpers.waits import eventually

pytestmark = pytest.mark.e2e


async def test_todays_userscript_sees_insert_update_delete_in_order(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    # FULL: the DELETE then comes on the faction's own channel, after the UPDATE. Under DEFAULT it comes
    # on the shared socket and may overtake the UPDATE, which is then dropped as superseded.
    fake_upstream.define_table("war_calls", replica_identity="full")
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            fake_upstream.insert("war_calls", call(FACTION, 1))
            fake_upstream.update("war_calls", 1, {"caller_id": 1_002, "caller_name": "bob"})
            fake_upstream.delete("war_calls", 1)
            await script.poll_until(3)
    payloads = [message["payload"] for message in script.messages]
    assert [message["event"] for message in script.messages] == ["postgres_changes"] * 3
    assert [p["eventType"] for p in payloads] == ["INSERT", "UPDATE", "DELETE"]
    assert all(p["table"] == "war_calls" and p["schema"] == "public" for p in payloads)
    inserted, updated, deleted = payloads
    assert inserted["new"] == call(FACTION, 1)
    assert inserted["old"] == {}
    assert (updated["new"]["caller_name"], updated["new"]["target_id"]) == ("bob", 2_000_001)
    assert deleted["new"] == {}
    assert deleted["old"]["target_id"] == 2_000_001  # how today's script recognises an uncall
    assert all(isinstance(p["commit_timestamp"], str) and p["errors"] is None for p in payloads)


async def test_one_faction_faulted_upstream_while_another_keeps_flowing(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            healthy, faulted = Userscript(http, FACTION), Userscript(http, OTHER_FACTION)
            await healthy.start()
            await faulted.start()
            await wait_connected(http, FACTION)
            await wait_connected(http, OTHER_FACTION)
            fake_upstream.fail_joins("RealtimeRestarting: Realtime is restarting, please standby")
            fake_upstream.shutdown_channel(
                f"realtime:public:war_calls:faction_id=eq.{OTHER_FACTION}", "Node request timeout"
            )
            for n in range(1, 4):
                fake_upstream.insert("war_calls", call(FACTION, n))
            await healthy.poll_until(3)
            status = {f["faction_id"]: f for f in (await http.get("/status")).json()["factions"]}
            assert status[FACTION]["upstream"]["state"] == "connected"
            assert status[OTHER_FACTION]["upstream"]["state"] in {"backoff", "connecting"}
            # The channel shutdown, or the refused rejoin after it, whichever came last.
            last_error = status[OTHER_FACTION]["upstream"]["last_error"]
            assert "Node request timeout" in last_error or "RealtimeRestarting" in last_error
            fake_upstream.accept_joins()
            await wait_connected(http, OTHER_FACTION)
            fake_upstream.insert("war_calls", call(OTHER_FACTION, 10))
            await faulted.poll_until(1)
    assert [m["payload"]["new"]["id"] for m in healthy.messages] == [1, 2, 3]
    assert [m["payload"]["new"]["id"] for m in faulted.messages] == [10]


async def test_shutdown_answers_a_long_poll_in_flight_and_closes_upstream(
    relay: RunningRelay, fake_upstream: FakeSupabase
) -> None:
    answers: list[httpx.Response] = []

    async def long_poll(http: httpx.AsyncClient) -> None:
        answers.append(await http.get("/events", params={"faction_id": FACTION, "wait": 30}))

    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=relay.url, timeout=60) as http:
            script = Userscript(http, FACTION)
            await script.start()
            await wait_connected(http, FACTION)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll, http)
                await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
                relay.stop()
            await fake_upstream.wait_until(lambda: not fake_upstream.connections)
    (answer,) = answers
    assert (answer.status_code, answer.json()["events"]) == (200, [])


async def test_an_upstream_record_json_cannot_carry_is_one_warning_not_a_bug(
    serve_config: tuple[Path, dict[str, str]], fake_upstream: FakeSupabase
) -> None:
    """A NaN in a row is upstream's data, not our bug: it was logged as an ERROR with a traceback,
    "connection failed unexpectedly", and the connection restarted."""
    config, env = serve_config
    with trio.fail_after(30):
        async with relay_process(config, env) as relay, httpx.AsyncClient(base_url=relay.url) as http:
            script = await connected_script(http, FACTION)
            fake_upstream.insert("war_calls", {**call(FACTION, 1), "range": float("nan")})
            fake_upstream.insert("war_calls", call(FACTION, 2))
            await script.poll_until(1)
            await eventually(lambda: "cannot be stored" in relay.text())
            assert "-> backoff" not in relay.text()  # the connection and the rest of the batch went on
            fake_upstream.insert("war_calls", call(FACTION, 3))
            await script.poll_until(2)
    assert [m["payload"]["new"]["id"] for m in script.messages] == [2, 3]
    dropped = [line for line in relay.log if "cannot be stored" in line]
    assert len(dropped) == 1
    assert " WARNING " in dropped[0]
    assert f"faction {FACTION}: a change to war_calls cannot be stored" in dropped[0]
    assert " ERROR " not in relay.text()
    assert "Traceback" not in relay.text()
