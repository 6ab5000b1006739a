"""The standby subscribe, through Quart's test client on a real relay: what an instance behind nginx
does with the copy of a subscribe that nginx mirrors to every instance (deploy/nginx.conf)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import trio

from relay.config import Config
from relay.http.api import STANDBY_HEADER
from relay.service import RunningRelay, run_relay
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION

pytestmark = pytest.mark.contract


async def subscribe(
    relay: RunningRelay, faction_id: Any = FACTION, *, standby: bool, key: str = ANON_KEY
) -> tuple[int, Any]:
    headers = {STANDBY_HEADER: "1"} if standby else {}
    response = await relay.app.test_client().post(
        "/subscribe", json={"faction_id": faction_id, "api_key": key}, headers=headers
    )
    return response.status_code, await response.get_json()


async def poll(relay: RunningRelay, faction_id: int = FACTION) -> tuple[int, Any]:
    response = await relay.app.test_client().get(f"/events?faction_id={faction_id}")
    return response.status_code, await response.get_json()


async def upstream_state(relay: RunningRelay, faction_id: int = FACTION) -> str:
    status = await (await relay.app.test_client().get("/status")).get_json()
    (faction,) = [f for f in status["factions"] if f["faction_id"] == faction_id]
    state: str = faction["upstream"]["state"]
    return state


async def test_a_standby_subscribe_makes_the_faction_known_without_a_socket(relay: RunningRelay) -> None:
    status, body = await subscribe(relay, str(FACTION), standby=True)
    assert (status, body) == (200, {"status": "standby", "faction_id": FACTION})
    subscription = relay.store.subscription(FACTION)
    assert subscription is not None
    assert subscription.active is False
    assert relay.store.active_factions() == []
    assert FACTION not in relay.supervisors.statistics()
    assert await upstream_state(relay) == "stopped"


async def test_a_poll_revives_a_standby_faction_as_after_its_instance_went_away(relay: RunningRelay) -> None:
    await subscribe(relay, standby=True)
    status, body = await poll(relay)
    assert (status, body["events"]) == (200, [])
    assert relay.store.active_factions() == [FACTION]
    assert relay.supervisors.statistics()[FACTION].state != "stopped"


async def test_a_standby_subscribe_leaves_a_known_faction_as_it_is(relay: RunningRelay) -> None:
    await subscribe(relay, FACTION, standby=False)
    await subscribe(relay, OTHER_FACTION, standby=False)
    assert set(await relay.store.expire_idle(-1)) == {FACTION, OTHER_FACTION}
    await relay.supervisors.stop(OTHER_FACTION)
    await relay.supervisors.stop(FACTION)
    await subscribe(relay, FACTION, standby=False)  # active again; OTHER_FACTION stays expired
    expired_before = relay.store.subscription(OTHER_FACTION)

    assert (await subscribe(relay, FACTION, standby=True))[1]["status"] == "standby"
    assert (await subscribe(relay, OTHER_FACTION, standby=True))[1]["status"] == "standby"
    assert relay.store.active_factions() == [FACTION]
    assert relay.supervisors.statistics()[FACTION].state != "stopped"
    assert relay.store.subscription(OTHER_FACTION) == expired_before


async def test_a_subscribe_after_a_standby_one_activates_the_faction(relay: RunningRelay) -> None:
    await subscribe(relay, standby=True)
    status, body = await subscribe(relay, standby=False)
    assert (status, body["status"]) == (200, "subscribed")
    assert relay.store.active_factions() == [FACTION]
    assert relay.supervisors.statistics()[FACTION].state != "stopped"


async def test_a_standby_subscribe_is_refused_like_any_subscribe(relay: RunningRelay) -> None:
    assert (await subscribe(relay, standby=True, key="wrong"))[1]["code"] == "invalid_api_key"
    assert (await subscribe(relay, "46666x", standby=True))[1]["code"] == "invalid_faction_id"
    response = await relay.app.test_client().post(
        "/subscribe", data=b"{", headers={STANDBY_HEADER: "1", "Content-Type": "application/json"}
    )
    assert (response.status_code, (await response.get_json())["code"]) == (400, "invalid_json")
    assert relay.store.known_factions() == []


async def test_other_header_values_are_an_ordinary_subscribe(relay: RunningRelay) -> None:
    response = await relay.app.test_client().post(
        "/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY}, headers={STANDBY_HEADER: "0"}
    )
    assert (await response.get_json())["status"] == "subscribed"
    assert relay.store.active_factions() == [FACTION]


async def test_standby_factions_take_no_capacity_until_a_poll_revives_them(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    small: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nmax_factions = 1\n"))
    )
    assert (await subscribe(small, FACTION, standby=False))[0] == 200
    assert (await subscribe(small, OTHER_FACTION, standby=True)) == (
        200,
        {"status": "standby", "faction_id": OTHER_FACTION},
    )
    status, body = await poll(small, OTHER_FACTION)
    assert (status, body["code"]) == (429, "too_many_factions")
    small.stop()


async def test_standby_subscribes_for_new_factions_are_bounded(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    """At most `max_standby_factions` known factions inactive: new ones beyond it are refused, known
    ones are left as they are, and a faction revived by a poll makes room again."""
    small: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nmax_standby_factions = 2\n"))
    )
    assert (await subscribe(small, 1, standby=True))[0] == 200
    assert (await subscribe(small, 2, standby=True))[0] == 200
    status, body = await subscribe(small, 3, standby=True)
    assert (status, body["code"]) == (429, "too_many_standby_factions")
    assert "at most 2 factions" in body["error"]
    assert small.store.subscription(3) is None
    assert (await subscribe(small, 2, standby=True)) == (200, {"status": "standby", "faction_id": 2})
    assert (await subscribe(small, 3, standby=False))[1]["status"] == "subscribed"  # its own bound
    assert (await poll(small, 1))[0] == 200  # faction 1 taken over: active, so one inactive left
    assert (await subscribe(small, 4, standby=True))[0] == 200
    assert (await subscribe(small, 5, standby=True))[0] == 429
    assert small.store.known_factions() == [1, 2, 3, 4]
    small.stop()


async def test_expired_factions_count_as_inactive(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    small: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nmax_standby_factions = 1\n"))
    )
    assert (await subscribe(small, FACTION, standby=False))[0] == 200
    assert await small.store.expire_idle(-1) == [FACTION]
    status, body = await subscribe(small, OTHER_FACTION, standby=True)
    assert (status, body["code"]) == (429, "too_many_standby_factions")
    small.stop()


async def test_concurrent_standby_subscribes_do_not_overshoot_the_bound(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    small: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nmax_standby_factions = 3\n"))
    )
    statuses: list[int] = []

    async def one(faction_id: int) -> None:
        statuses.append((await subscribe(small, faction_id, standby=True))[0])

    with trio.fail_after(10):
        async with trio.open_nursery() as requests:
            for faction_id in range(1, 11):
                requests.start_soon(one, faction_id)
    assert sorted(statuses) == [200] * 3 + [429] * 7
    assert len(small.store.known_factions()) == 3
    small.stop()


async def test_standby_subscribes_are_rate_limited_per_address(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    limited: RunningRelay = await nursery.start(
        functools.partial(
            run_relay,
            make_config("[limits]\nclient_rate = 0.001\nclient_burst = 3\nmax_standby_factions = 100\n"),
        )
    )
    statuses = [(await subscribe(limited, faction_id, standby=True))[0] for faction_id in range(1, 5)]
    assert statuses == [200, 200, 200, 429]
    status, body = await subscribe(limited, 5, standby=True)
    assert (status, body["code"]) == (429, "rate_limited")
    assert len(limited.store.known_factions()) == 3
    limited.stop()
