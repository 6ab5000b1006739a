"""Long-poll, SSE, next_poll_ms and publishing, over real sockets against hypercorn."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from relay.config import Config
from relay.http.delivery import DeliveryStatistics, HeldRequests
from relay.service import RunningRelay, run_relay
from relay.upstream.phoenix import ChangeReceived
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION
from tests.helpers.sse_client import open_sse
from tests.helpers.waits import eventually


@pytest.fixture
async def http(relay: RunningRelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
        subscribed = await client.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
        assert subscribed.status_code == 200
        yield client


async def append(relay: RunningRelay, *numbers: int, faction_id: int = FACTION) -> list[int]:
    """Upstream changes, through the relay's own ingest: committed, then the faction's waiters woken."""
    # A table the relay does not track: the reconcile against the fake's empty tables leaves it alone.
    changes = [ChangeReceived("test_rows", {"table": "test_rows", "new": {"id": n}}) for n in numbers]
    stored = await relay.services.ingest.upstream(faction_id, changes)
    return [event.timestamp for event in stored]


def ids(body: dict[str, Any]) -> list[int]:
    return [event["data"]["new"]["id"] for event in body["events"]]


async def long_poll(http: httpx.AsyncClient, since: int, wait: float, into: list[dict[str, Any]]) -> None:
    response = await http.get("/events", params={"faction_id": FACTION, "since": since, "wait": wait})
    assert response.status_code == 200
    into.append(response.json())


@pytest.mark.e2e
async def test_a_long_poll_with_events_waiting_answers_at_once(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    (stamp,) = await append(relay, 1)
    with trio.fail_after(5):
        body = (
            await http.get("/events", params={"faction_id": FACTION, "since": stamp - 1, "wait": 25})
        ).json()
    assert ids(body) == [1]
    assert body["timestamp"] == stamp


@pytest.mark.e2e
async def test_a_wait_above_the_limit_is_clamped_however_long_its_spelling(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    # The longest spelling of a double (found by schemathesis: it used to be refused as invalid_wait).
    (stamp,) = await append(relay, 1)
    params: dict[str, str | int] = {
        "faction_id": FACTION,
        "since": stamp - 1,
        "wait": "1.1041839962654692e+308",
    }
    with trio.fail_after(5):
        response = await http.get("/events", params=params)
    assert response.status_code == 200
    assert ids(response.json()) == [1]


@pytest.mark.e2e
async def test_a_held_long_poll_answers_with_the_next_burst(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    answers: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll, http, relay.store.cursor(), 25, answers)
            await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
            stamps = await append(relay, 1)
            stamps += await append(relay, 2, 3)  # within the linger: the same answer
    (body,) = answers
    assert ids(body) == [1, 2, 3]
    assert body["timestamp"] == stamps[-1]
    assert relay.services.held.statistics().held_long_polls == 0


@pytest.mark.e2e
async def test_members_held_on_one_cursor_are_answered_with_one_answer_built_once(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    answers: list[dict[str, Any]] = []
    members = 20
    poll_answers = relay.app.answers
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            since = relay.store.cursor()
            for _ in range(members):
                nursery.start_soon(long_poll, http, since, 25, answers)
            await eventually(lambda: relay.services.held.statistics().held_long_polls == members)
            built_before = poll_answers.built
            await append(relay, 1)
    assert len(answers) == members
    assert all(body == answers[0] for body in answers)
    assert ids(answers[0]) == [1]
    assert poll_answers.built == built_before + 1


@pytest.mark.e2e
async def test_a_long_poll_ignores_other_factions_and_times_out_with_a_valid_cursor(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    await http.post("/subscribe", json={"faction_id": OTHER_FACTION, "api_key": ANON_KEY})
    answers: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll, http, relay.store.cursor(), 0.3, answers)
            await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
            await append(relay, 9, faction_id=OTHER_FACTION)
    (body,) = answers
    assert body["events"] == []
    (later,) = await append(relay, 1)
    assert later > body["timestamp"]


@pytest.mark.e2e
async def test_a_long_poll_whose_client_hangs_up_is_released_at_once(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET /events?faction_id={FACTION}&since={relay.store.cursor()}&wait=25 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request.encode())
        await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
        await stream.aclose()
        # Long before its 25 s are up: a member closing the tab frees the slot under the cap.
        await eventually(lambda: relay.services.held.statistics().held_long_polls == 0)


@pytest.mark.e2e
async def test_shutdown_answers_held_long_polls_at_once(relay: RunningRelay, http: httpx.AsyncClient) -> None:
    answers: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll, http, relay.store.cursor(), 25, answers)
            await eventually(lambda: relay.services.held.statistics().held_long_polls == 1)
            relay.stop()
    assert answers[0]["events"] == []


@pytest.mark.e2e
async def test_over_the_cap_a_long_poll_is_answered_as_a_plain_poll(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    capped: RunningRelay = await nursery.start(
        functools.partial(run_relay, make_config("[limits]\nmax_held_requests = 0\n"))
    )
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=capped.url) as http:
            await http.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
            response = await http.get("/events", params={"faction_id": FACTION, "wait": 25})
            assert (response.status_code, response.json()["events"]) == (200, [])
            assert capped.services.held.statistics().refused_over_cap == 1
            stream = await http.get("/events/stream", params={"faction_id": FACTION})
            assert (stream.status_code, stream.json()["code"]) == (503, "too_many_streams")
            assert stream.headers["Retry-After"] == "30"
    capped.stop()


@pytest.mark.unit
def test_a_held_place_is_given_back_however_its_request_ends() -> None:
    held = HeldRequests(limit=2)
    with held.long_poll() as polling, held.stream() as streaming:
        assert (polling, streaming) == (True, True)
        assert held.statistics() == DeliveryStatistics(held_long_polls=1, open_streams=1, refused_over_cap=0)
        with held.stream() as over_the_cap, held.long_poll() as also_over:
            assert (over_the_cap, also_over) == (False, False)
        assert held.held == 2  # a refused place is not given back: it was never taken
    assert held.statistics() == DeliveryStatistics(held_long_polls=0, open_streams=0, refused_over_cap=2)
    with pytest.raises(trio.BrokenResourceError), held.stream():
        raise trio.BrokenResourceError("the client went away mid-stream")
    assert held.held == 0


@pytest.mark.e2e
async def test_next_poll_ms_follows_the_factions_activity(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    idle = (await http.get("/events", params={"faction_id": FACTION})).json()
    assert idle["next_poll_ms"] == 10_000
    await append(relay, 1)
    active = (await http.get("/events", params={"faction_id": FACTION})).json()
    assert active["next_poll_ms"] == 1_000


@pytest.mark.e2e
async def test_sse_streams_new_events_with_ids_types_and_the_event_json(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        async with open_sse(relay.url, f"/events/stream?faction_id={FACTION}") as stream:
            assert stream.status == 200
            assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert stream.headers["cache-control"] == "no-cache"
            assert stream.headers["x-accel-buffering"] == "no"
            assert stream.headers["access-control-allow-origin"] == "*"
            await eventually(lambda: relay.services.held.statistics().open_streams == 1)
            stamps = await append(relay, 1, 2)
            first, second = await stream.next_record(), await stream.next_record()
    assert stream.retry == "3000"
    assert [first["id"], second["id"]] == [str(stamp) for stamp in stamps]
    assert first["event"] == "postgres_changes"
    assert json.loads(first["data"])["data"]["new"]["id"] == 1
    assert json.loads(first["data"])["timestamp"] == stamps[0]
    await eventually(lambda: relay.services.held.statistics().open_streams == 0)


@pytest.mark.e2e
@pytest.mark.parametrize("resume", ["since", "Last-Event-ID", "since, with an empty Last-Event-ID"])
async def test_sse_resumes_after_since_or_last_event_id(
    relay: RunningRelay, http: httpx.AsyncClient, resume: str
) -> None:
    first, _second = await append(relay, 1, 2)
    if resume == "since":
        path, headers = f"/events/stream?faction_id={FACTION}&since={first}", {}
    elif resume.startswith("since"):
        # An EventSource never sends an empty Last-Event-ID; one that comes is no resume point.
        # Found by schemathesis (tests/test_openapi.py): it used to replay every retained event.
        path, headers = f"/events/stream?faction_id={FACTION}&since={first}", {"Last-Event-ID": ""}
    else:
        # The header wins: EventSource reconnects with the URL it started with, plus Last-Event-ID.
        path, headers = f"/events/stream?faction_id={FACTION}&since=0", {"Last-Event-ID": str(first)}
    with trio.fail_after(10):
        async with open_sse(relay.url, path, headers) as stream:
            record = await stream.next_record()
    assert json.loads(record["data"])["data"]["new"]["id"] == 2


@pytest.mark.e2e
async def test_sse_keep_alive_comment_and_shutdown_ends_the_stream(
    relay: RunningRelay, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relay.http.delivery.SSE_KEEPALIVE_S", 0.05)
    with trio.fail_after(10):
        async with open_sse(relay.url, f"/events/stream?faction_id={FACTION}") as stream:
            await eventually(lambda: relay.hub.statistics().factions_waited_on == 1)
            async with trio.open_nursery() as timer:
                # The hub's timer at the patched interval (the relay's own started with the real one).
                timer.start_soon(relay.hub.wake_quiet_factions_every, 0.05)
                assert await stream.next_record() == {"comment": "keep-alive"}
                timer.cancel_scope.cancel()
            relay.stop()
            rest = await stream.read_body()
    assert b"id:" not in rest


@pytest.mark.e2e
async def test_published_events_are_stored_and_delivered_like_upstream_ones(
    relay: RunningRelay, http: httpx.AsyncClient
) -> None:
    since = relay.store.cursor()
    hospital = {"members": [{"id": 7, "until": 1732460000}]}
    published = await http.post(
        "/events",
        json={"faction_id": FACTION, "api_key": ANON_KEY, "type": "hospital_update", "data": hospital},
    )
    assert published.status_code == 200
    assert published.json()["status"] == "published"
    legacy = await http.post(
        f"/faction-members?apikey={ANON_KEY}", json={"faction_id": FACTION, "members": {"7": {}}}
    )
    assert legacy.status_code == 200
    hospital_legacy = await http.post(
        "/hospital", json={"faction_id": str(FACTION), "api_key": ANON_KEY, "data": {}}
    )
    assert hospital_legacy.status_code == 200
    body = (await http.get("/events", params={"faction_id": FACTION, "since": since})).json()
    assert [(event["type"], event["data"]) for event in body["events"]] == [
        ("hospital_update", hospital),
        ("faction_members_update", {"7": {}}),
        ("hospital_update", {}),
    ]
    assert body["events"][0]["id"] == published.json()["id"]
