"""Every refusal the API can give: its status, its `code`, and the one error shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from relay.service import BuiltRelay, RunningRelay
from tests.helpers.factions import ANON_KEY, FACTION
from tests.helpers.sse_client import open_sse

BAD_FACTION_IDS: list[Any] = [
    None,
    0,
    -1,
    2**31,
    2**63,
    1.5,
    46666.0,
    True,
    "",
    "12a",
    "-5",
    " 5",
    "٣",
    "1" * 11,
    [1],
    {},
]


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code
    assert isinstance(body["error"], str)
    assert body["error"]


async def post(relay: BuiltRelay, path: str, data: bytes, **headers: str) -> tuple[int, Any]:
    response = await relay.app.test_client().post(path, data=data, headers=headers)
    return response.status_code, await response.get_json()


async def get(relay: BuiltRelay, path: str) -> tuple[int, Any]:
    response = await relay.app.test_client().get(path)
    return response.status_code, await response.get_json()


@pytest.mark.contract
@pytest.mark.parametrize("faction_id", BAD_FACTION_IDS)
async def test_subscribe_invalid_faction_id(relay_app: BuiltRelay, faction_id: Any) -> None:
    response = await relay_app.app.test_client().post(
        "/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY}
    )
    assert_error(response.status_code, await response.get_json(), 400, "invalid_faction_id")


@pytest.mark.contract
@pytest.mark.parametrize("number", ["1e999999", "NaN", "-Infinity"])
async def test_a_number_json_cannot_carry_is_invalid_json(relay_app: BuiltRelay, number: str) -> None:
    body = f'{{"faction_id": {number}, "api_key": "{ANON_KEY}"}}'.encode()
    assert_error(*await post(relay_app, "/subscribe", body), 400, "invalid_json")


@pytest.mark.contract
async def test_subscribe_missing_faction_id(relay_app: BuiltRelay) -> None:
    response = await relay_app.app.test_client().post("/subscribe", json={"api_key": ANON_KEY})
    assert_error(response.status_code, await response.get_json(), 400, "invalid_faction_id")


@pytest.mark.contract
@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b"[" * 5000])
async def test_subscribe_invalid_json(relay_app: BuiltRelay, body: bytes) -> None:
    assert_error(
        *await post(relay_app, "/subscribe", body, **{"Content-Type": "application/json"}),
        400,
        "invalid_json",
    )


@pytest.mark.contract
@pytest.mark.parametrize("key", [None, "", "wrong", 12345, ["test-anon-key"], "tëst"])
async def test_subscribe_invalid_api_key(relay_app: BuiltRelay, key: Any) -> None:
    response = await relay_app.app.test_client().post(
        "/subscribe", json={"faction_id": FACTION, "api_key": key}
    )
    assert_error(response.status_code, await response.get_json(), 401, "invalid_api_key")
    assert relay_app.store.subscription(FACTION) is None


@pytest.mark.contract
async def test_subscribe_body_too_large(relay_app: BuiltRelay) -> None:
    padding = "x" * 20_000
    body = f'{{"faction_id": {FACTION}, "api_key": "{ANON_KEY}", "pad": "{padding}"}}'.encode()
    assert_error(*await post(relay_app, "/subscribe", body), 413, "body_too_large")


@pytest.mark.contract
@pytest.mark.parametrize("faction_id", ["", "abc", "0", "-1", "2147483648", "1.5", "%D9%A3", "99999999999"])
async def test_events_invalid_faction_id(relay_app: BuiltRelay, faction_id: str) -> None:
    assert_error(*await get(relay_app, f"/events?faction_id={faction_id}"), 400, "invalid_faction_id")


@pytest.mark.contract
async def test_events_missing_faction_id(relay_app: BuiltRelay) -> None:
    assert_error(*await get(relay_app, "/events"), 400, "invalid_faction_id")


@pytest.mark.contract
async def test_events_not_subscribed(relay_app: BuiltRelay) -> None:
    assert_error(*await get(relay_app, f"/events?faction_id={FACTION}"), 404, "not_subscribed")


@pytest.mark.contract
@pytest.mark.parametrize("since", ["abc", "-1", "1.5", "1e9", "%D9%A3", "1" * 17, "99999999999999"])
async def test_events_invalid_since(relay_app: BuiltRelay, since: str) -> None:
    await relay_app.app.test_client().post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
    assert_error(*await get(relay_app, f"/events?faction_id={FACTION}&since={since}"), 400, "invalid_since")


@pytest.mark.contract
async def test_unknown_path_and_wrong_method(relay_app: BuiltRelay) -> None:
    assert_error(*await get(relay_app, "/nowhere"), 404, "not_found")
    assert_error(*await get(relay_app, "/subscribe"), 405, "method_not_allowed")
    response = await relay_app.app.test_client().put("/events", data=b"{}")
    assert_error(response.status_code, await response.get_json(), 405, "method_not_allowed")


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/subscribe", {"POST", "OPTIONS"}),
        ("TRACE", "/ping", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/events", {"GET", "POST", "OPTIONS"}),  # GET is answered in front of Quart
        ("HEAD", "/events", {"GET", "POST", "OPTIONS"}),
        ("DELETE", "/events/stream", {"GET", "OPTIONS"}),
    ],
)
async def test_a_wrong_method_is_told_the_methods_the_path_answers(
    relay: RunningRelay, method: str, path: str, allow: set[str]
) -> None:
    # RFC 9110 (15.5.6): a 405 carries Allow. Found by schemathesis (tests/test_openapi.py).
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=relay.url) as http:
            response = await http.request(method, path)
    assert response.status_code == 405
    assert {name.strip() for name in response.headers["Allow"].split(",")} == allow
    if method != "HEAD":
        assert_error(405, response.json(), 405, "method_not_allowed")


@pytest.mark.e2e
@pytest.mark.parametrize("since", ["abc", "-1"])
async def test_a_streams_invalid_since_is_refused_even_with_a_resume_point(
    relay: RunningRelay, since: str
) -> None:
    # Last-Event-ID wins over since, but since is checked all the same. Found by schemathesis.
    await relay.app.test_client().post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
    path = f"/events/stream?faction_id={FACTION}&since={since}"
    with trio.fail_after(10):
        async with open_sse(relay.url, path, {"Last-Event-ID": "0"}) as stream:
            assert stream.status == 400  # an opened stream would never end
            body = json.loads(await stream.read_body())
    assert_error(400, body, 400, "invalid_since")


# " 1" (also what "+1" decodes to), "1_0" and "-0" are numbers to Python's float(), not to a client.
@pytest.mark.contract
@pytest.mark.parametrize(
    "wait", ["abc", "-1", "nan", "inf", "1e400", "%D9%A3", "1" * 33, "%201", "1_0", "-0", "1e", "."]
)
async def test_events_invalid_wait(relay_app: BuiltRelay, wait: str) -> None:
    await relay_app.app.test_client().post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
    assert_error(*await get(relay_app, f"/events?faction_id={FACTION}&wait={wait}"), 400, "invalid_wait")


async def publish(relay_app: BuiltRelay, body: dict[str, Any], path: str = "/events") -> tuple[int, Any]:
    response = await relay_app.app.test_client().post(path, json=body)
    return response.status_code, await response.get_json()


@pytest.mark.contract
@pytest.mark.parametrize("event_type", [None, 5, "", "postgres_changes", "war_calls", "hospital_update "])
async def test_publish_invalid_type(relay_app: BuiltRelay, event_type: Any) -> None:
    await relay_app.app.test_client().post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
    body = {"faction_id": FACTION, "api_key": ANON_KEY, "type": event_type, "data": {}}
    assert_error(*await publish(relay_app, body), 400, "invalid_type")


@pytest.mark.contract
@pytest.mark.parametrize("data", [None, "text", 5, True])
async def test_publish_invalid_data(relay_app: BuiltRelay, data: Any) -> None:
    await relay_app.app.test_client().post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
    body = {"faction_id": FACTION, "api_key": ANON_KEY, "type": "hospital_update", "data": data}
    assert_error(*await publish(relay_app, body), 400, "invalid_data")
    assert_error(
        *await publish(relay_app, {"faction_id": FACTION, "api_key": ANON_KEY, "data": data}, "/hospital"),
        400,
        "invalid_data",
    )


@pytest.mark.contract
@pytest.mark.parametrize("path", ["/events", "/hospital", "/faction-members"])
async def test_publish_needs_the_key_and_a_subscribed_faction(relay_app: BuiltRelay, path: str) -> None:
    body = {"faction_id": FACTION, "type": "hospital_update", "data": {}, "members": {}}
    assert_error(*await publish(relay_app, body, path), 401, "invalid_api_key")
    assert_error(*await publish(relay_app, {**body, "api_key": "wrong"}, path), 401, "invalid_api_key")
    assert_error(*await publish(relay_app, {**body, "api_key": ANON_KEY}, path), 404, "not_subscribed")
    assert_error(
        *await publish(relay_app, {**body, "api_key": ANON_KEY, "faction_id": "x"}, path),
        400,
        "invalid_faction_id",
    )


@pytest.mark.contract
async def test_publish_body_limit_is_its_own(relay_app: BuiltRelay) -> None:
    members = {str(n): {"name": "x" * 200} for n in range(1500)}  # ~330 KB: over publish.max_body_bytes
    body = json.dumps({"faction_id": FACTION, "api_key": ANON_KEY, "members": members}).encode()
    assert_error(*await post(relay_app, "/faction-members", body), 413, "body_too_large")


@pytest.mark.contract
async def test_stream_of_an_unknown_faction_is_refused_before_streaming(relay_app: BuiltRelay) -> None:
    assert_error(*await get(relay_app, f"/events/stream?faction_id={FACTION}"), 404, "not_subscribed")
    assert_error(*await get(relay_app, "/events/stream?faction_id=0"), 400, "invalid_faction_id")
