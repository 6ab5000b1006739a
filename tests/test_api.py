"""The HTTP contract through Quart's test client, on the app and services `run_relay` builds
(`build_services`), over a real store and never started (tests/helpers/contract.py); only what needs a
live upstream runs a whole relay."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as QuartClient

from relay.config import Config, RetentionConfig
from relay.http.answers import MAX_CACHED_BYTES, MAX_LARGE_CACHED_BYTES
from relay.service import BuiltRelay, RunningRelay, run_relay
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION

pytestmark = pytest.mark.contract


def client(relay: BuiltRelay) -> QuartClient:
    return relay.app.test_client()


async def subscribe(relay: BuiltRelay, faction_id: Any = FACTION, key: str = ANON_KEY) -> Any:
    response = await client(relay).post("/subscribe", json={"faction_id": faction_id, "api_key": key})
    return response.status_code, await response.get_json()


async def events(relay: BuiltRelay, query: str) -> tuple[int, Any]:
    response = await client(relay).get(f"/events?{query}")
    return response.status_code, await response.get_json()


def change(n: int) -> dict[str, Any]:
    # A table the relay_app does not track: the reconcile against the fake's empty tables leaves it alone.
    return {"table": "test_rows", "eventType": "INSERT", "new": {"id": n, "faction_id": FACTION}, "old": {}}


async def test_ping_tells_todays_script_the_relay_is_there(relay_app: BuiltRelay) -> None:
    response = await client(relay_app).get("/ping")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = await response.get_json()
    assert body["status"] == "ok"
    assert body["deployed"] is True
    assert body["online"] is True
    assert body["version"].count(".") == 2


async def test_health_answers_while_the_store_does(relay_app: BuiltRelay) -> None:
    response = await client(relay_app).get("/health")
    assert (response.status_code, await response.get_json()) == (200, {"status": "ok"})


async def test_subscribe_accepts_numbers_and_digit_strings_and_is_idempotent(relay_app: BuiltRelay) -> None:
    status, body = await subscribe(relay_app, FACTION)
    assert status == 200
    assert body == {"status": "subscribed", "faction_id": FACTION, "timestamp": relay_app.store.cursor()}
    status, again = await subscribe(relay_app, str(FACTION))
    assert (status, again["faction_id"]) == (200, FACTION)
    assert relay_app.store.active_factions() == [FACTION]


async def test_events_since_returns_newer_events_oldest_first_with_the_cursor(relay_app: BuiltRelay) -> None:
    await subscribe(relay_app)
    stored = await relay_app.store.append_events(FACTION, [("postgres_changes", change(n)) for n in range(3)])
    status, body = await events(relay_app, f"faction_id={FACTION}")
    assert status == 200
    assert [event["id"] for event in body["events"]] == [event.id for event in stored]
    assert body["timestamp"] == stored[-1].timestamp
    first = body["events"][0]
    assert first == {
        "id": stored[0].id,
        "type": "postgres_changes",
        "timestamp": stored[0].timestamp,
        "data": change(0),
    }
    status, body = await events(relay_app, f"faction_id={FACTION}&since={stored[0].timestamp}")
    assert [event["data"]["new"]["id"] for event in body["events"]] == [1, 2]
    status, body = await events(relay_app, f"faction_id={FACTION}&since={stored[-1].timestamp}")
    assert body["events"] == []
    assert body["timestamp"] >= stored[-1].timestamp
    (later,) = await relay_app.store.append_events(FACTION, [("postgres_changes", change(3))])
    assert later.timestamp > body["timestamp"]


async def test_empty_since_means_everything_retained(relay_app: BuiltRelay) -> None:
    await subscribe(relay_app)
    await relay_app.store.append_events(FACTION, [("postgres_changes", change(1))])
    status, body = await events(relay_app, f"faction_id={FACTION}&since=")
    assert (status, len(body["events"])) == (200, 1)


async def test_a_since_ahead_of_the_relay_clock_does_not_hide_later_events(relay_app: BuiltRelay) -> None:
    await subscribe(relay_app)
    ahead = relay_app.store.cursor() + 120_000  # a member whose clock runs two minutes fast
    status, body = await events(relay_app, f"faction_id={FACTION}&since={ahead}")
    assert (status, body["events"]) == (200, [])
    assert body["timestamp"] >= ahead
    await relay_app.store.append_events(FACTION, [("postgres_changes", change(1))])
    status, body = await events(relay_app, f"faction_id={FACTION}&since={ahead}")
    assert [event["data"]["new"]["id"] for event in body["events"]] == [1]


async def test_events_are_per_faction(relay_app: BuiltRelay) -> None:
    await subscribe(relay_app, FACTION)
    await subscribe(relay_app, OTHER_FACTION)
    await relay_app.store.append_events(OTHER_FACTION, [("postgres_changes", change(1))])
    status, body = await events(relay_app, f"faction_id={FACTION}&since=0")
    assert (status, body["events"]) == (200, [])


async def test_a_poll_of_an_expired_faction_revives_it(relay_app: BuiltRelay) -> None:
    await subscribe(relay_app)
    assert await relay_app.store.expire_idle(-1) == [FACTION]
    await relay_app.supervisors.stop(FACTION)
    status, _ = await events(relay_app, f"faction_id={FACTION}")
    assert status == 200
    assert relay_app.store.active_factions() == [FACTION]
    assert relay_app.supervisors.statistics()[FACTION].state != "stopped"


async def test_status_lists_each_faction_with_its_upstream(relay: RunningRelay) -> None:
    await subscribe(relay)
    await relay.store.append_events(FACTION, [("postgres_changes", change(1))])
    response = await client(relay).get("/status")
    body = await response.get_json()
    assert set(body) == {
        "online",
        "timestamp",
        "now",
        "version",
        "uptime_s",
        "factions",
        "deafness",
        "shared_deletes",
    }
    assert body["online"] is True
    assert body["shared_deletes"]["state"] in {"connecting", "connected"}
    (faction,) = body["factions"]
    assert set(faction) == {
        "faction_id",
        "upstream",
        "reconcile",
        "events_stored",
        "last_event_at",
        "last_poll_at",
        "members",
        "events_per_minute",
    }
    assert set(faction["reconcile"]) == {
        "reconciles",
        "last_at",
        "differences",
        "last_error",
        "rest_requests",
        "rest_bytes",
        "requested",
        "due",
    }
    assert set(faction["upstream"]) == {
        "state",
        "attempts",
        "last_error",
        "connected_since",
        "next_attempt_in_s",
    }
    assert faction["upstream"]["state"] in {"connecting", "connected"}
    assert (faction["faction_id"], faction["events_stored"]) == (FACTION, 1)
    assert faction["last_event_at"] == relay.store.cursor()


async def test_cors_on_every_answer_and_preflight_answered(relay_app: BuiltRelay) -> None:
    for path in ["/ping", "/events?faction_id=x", "/nowhere"]:
        response = await client(relay_app).get(path)
        assert response.headers["Access-Control-Allow-Origin"] == "*", path
    preflight = await client(relay_app).options(
        "/subscribe", headers={"Origin": "https://www.torn.com", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]


async def test_max_factions_refuses_the_next_faction_but_not_a_known_one(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    small: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nmax_factions = 1\n"))
    )
    assert (await subscribe(small, FACTION))[0] == 200
    assert (await subscribe(small, FACTION))[0] == 200
    status, body = await subscribe(small, OTHER_FACTION)
    assert (status, body["code"]) == (429, "too_many_factions")
    small.stop()


async def test_the_browser_client_is_served_as_javascript(relay_app: BuiltRelay) -> None:
    response = await client(relay_app).get("/client.js", headers={"Host": "relay.example:8444"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    source = await response.get_data(as_text=True)
    assert "function createCATRelayConnection" in source
    assert "CATRelayClient" in source
    # The relay_app's own address, from the request, so that `@require https://<relay_app>/client.js` just works.
    assert source.endswith('\nCATRelay.defaults.relayUrl = "http://relay.example:8444";\n')


async def test_status_counts_members_by_address_and_events_per_minute(relay_app: BuiltRelay) -> None:
    await subscribe(relay_app)
    for address in ("198.51.100.7", "198.51.100.7", "203.0.113.9"):
        response = await client(relay_app).get(
            f"/events?faction_id={FACTION}", scope_base={"client": (address, 40000)}
        )
        assert response.status_code == 200
    for n in range(3):
        response = await client(relay_app).post(
            "/events",
            json={"faction_id": FACTION, "api_key": ANON_KEY, "type": "hospital_update", "data": {"n": n}},
        )
        assert response.status_code == 200
    body = await (await client(relay_app).get("/status")).get_json()
    (faction,) = body["factions"]
    assert faction["members"] == 2
    assert len(faction["events_per_minute"]) == 30
    assert sum(faction["events_per_minute"][-2:]) == 3  # a minute may have begun meanwhile
    assert sum(faction["events_per_minute"]) == 3
    assert body["now"] >= faction["last_event_at"]


async def test_static_files_are_served_only_by_their_own_routes(relay_app: BuiltRelay) -> None:
    for path in ("/static/status.html", "/static/client.js"):
        response = await client(relay_app).get(path)
        assert response.status_code == 404, path


async def test_the_package_folder_is_not_served_as_static_files(relay_app: BuiltRelay) -> None:
    # Quart's default static route would serve relay_app/static/ at /static/..., paths nobody documented
    # (found by the route check in tests/test_openapi.py).
    response = await client(relay_app).get("/static/client.js")
    assert response.status_code == 404
    assert (await response.get_json())["code"] == "not_found"


async def test_readers_far_behind_share_one_large_answer(relay_app: BuiltRelay) -> None:
    """Twenty published events of 250 KB: a member far behind is answered a page of them (at most
    `retention.memory_bytes_per_faction`, a large answer); a second member as far behind is sent the
    answer built for the first, although other polls were answered in between."""
    await subscribe(relay_app)
    for n in range(20):
        response = await client(relay_app).post(
            "/events",
            json={
                "faction_id": FACTION,
                "api_key": ANON_KEY,
                "type": "hospital_update",
                "data": {"n": n, "blob": "x" * 250_000},
            },
        )
        assert response.status_code == 200
    answers = relay_app.app.answers
    status, first = await events(relay_app, f"faction_id={FACTION}&since=0")
    assert (status, first["truncated"]) == (200, True)  # 20 x 250 KB is more than a faction keeps
    assert len(first["events"]) == RetentionConfig().memory_bytes_per_faction // 250_000
    built = answers.built
    newest = relay_app.services.store.cursor()
    status, caught_up = await events(relay_app, f"faction_id={FACTION}&since={newest}")
    assert (status, caught_up["events"]) == (200, [])
    status, again = await events(relay_app, f"faction_id={FACTION}&since=0")
    assert (status, again) == (200, first)
    assert answers.built == built + 1  # the caught-up member's empty answer only
    assert answers.retained_bytes <= MAX_CACHED_BYTES + MAX_LARGE_CACHED_BYTES
