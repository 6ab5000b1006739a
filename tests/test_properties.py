"""Property-based abuse of the whole HTTP API: whatever a client sends (any method, path, query,
headers and body), the relay answers without a 5xx, every refusal has the one error shape, CORS is on
every answer, nothing stays held, the relay keeps answering, and the events it stored stay as they were.

How Hypothesis meets Trio here. pytest-trio's own Hypothesis support runs every example in a fresh
`trio.run` and sets the test's Trio fixtures up again for each one: a relay from a fixture would belong
to one example, or worse to an earlier, finished run (what Hypothesis' `function_scoped_fixture`
health check warns about). These tests want the opposite, one relay absorbing every example, so that
damage accumulating across requests shows. So each test is a plain pytest-trio test that starts one
relay and then runs a Hypothesis-decorated *sync* property in a worker thread
(`trio.to_thread.run_sync`); each example sends its request back into the test's Trio loop with
`trio.from_thread.run`, through Quart's test client. Hypothesis sees an ordinary function (no fixtures,
no health check to suppress), and shrinking replays against the same relay. Examples are derandomized
and the example database is off, so every run sends the same requests.

Requests that would be held are kept short: `long_poll_max_wait_s` is at most 0.05 s here, and an SSE stream
that opens is read up to its first chunk (`retry:`) and then dropped, as a client going away would be.
Left out on purpose, because hypercorn would never hand them to the app: a Content-Length that lies
about the body, control characters in header values, and paths the test client itself cannot send
(see `chaotic_paths`). Cursors are drawn as offsets from the wall clock, so a replayed example keeps
its meaning (ahead of the relay, behind it, beyond the allowed skew) while its digits change.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from relay.config import Config
from relay.service import RunningRelay, run_relay
from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, FACTION, OTHER_FACTION

pytestmark = pytest.mark.contract

# "roomy": the defaults, except that long-polls give up after 50 ms, trimming is pushed out of reach
# (so that "stored events are unchanged" is exact), a few factions only (so that the limit is reached),
# and no per-address rate limit (every test-client request comes from one address).
# "tight": every limit at its edge: small bodies, nothing may be held (streams get 503, long-polls answer
# at once), no clock skew, subscriptions expiring under the requests, and the rate limit biting.
CONFIGS = {
    "roomy": """
[retention]
events_per_faction = 100000
[limits]
long_poll_max_wait_s = 0.05
max_factions = 5
client_rate = 0
""",
    "tight": """
[server]
max_body_bytes = 1024
[publish]
max_body_bytes = 2048
[retention]
events_per_faction = 100000
maintenance_interval_s = 0.2
subscription_ttl_s = 0.1
[limits]
long_poll_max_wait_s = 0.0
max_held_requests = 0
max_factions = 2
max_clock_skew_s = 0.0
client_rate = 50
client_burst = 50
""",
}
# Either side of both configs' body limits.
BODY_SIZES = (1024, 1025, 2048, 2049, 16_384, 16_385, 262_144, 262_145, 400_000)
EXAMPLES = 300
# An answer (not a stream) taking longer than this is a request the relay held when it should not.
ANSWER_TIMEOUT_S = 5.0
JSON_TYPE = "application/json; charset=utf-8"
SSE_TYPE = "text/event-stream; charset=utf-8"
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
PUBLISH_PATHS = ("/events", "/hospital", "/faction-members")
REAL_PATHS = (
    "/ping",
    "/health",
    "/subscribe",
    "/events",
    "/events/stream",
    "/status",
    "/client.js",
    "/hospital",
    "/faction-members",
)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND")
PERCENT_JUNK = (
    "%",
    "%%",
    "%0",
    "%zz",
    "%FF",
    "%00",
    "%C3%28",
    "%E2%82",
    "%ED%A0%80",
    "%2F",
    "%3F",
    "%26",
    "+",
)
# Numbers as text that int() or float() might take but the contract refuses, or that are just odd.
ODD_NUMBERS: tuple[str, ...] = (
    "",
    "0",
    "-0",
    "00046666",
    "+46666",
    " 46666",
    "46666 ",
    "4.6666e4",
    "46666.0",
)
ODD_NUMBERS += (
    "1e400",
    "nan",
    "inf",
    "-inf",
    "Infinity",
    "٣",
    "\uff11\uff12",
    "0x10",
    "1_000",
    "9" * 17,
    "9" * 5000,
)
OTHER_HEADERS = (
    "Origin",
    "Accept",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
    "Cookie",
    "Authorization",
    "X-Forwarded-For",
    "Range",
    "Content-Encoding",
    "Connection",
    "Expect",
)
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/json; charset=bogus",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/form-data; boundary=x",
    "text/event-stream",
    "",
    "*/*;;;=",
)


# --- what a request is, and how it is sent ---


@dataclass(frozen=True, slots=True)
class Probe:
    """One request, as printed by Hypothesis for a failing example: enough to replay it by hand."""

    method: str
    target: str  # path, then '?' and the raw (ASCII) query if any
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Headers
    body: bytes
    streamed: bool  # an SSE stream that opened: only its first chunk was read


async def exchange(app: QuartTrio, probe: Probe) -> Answer:
    """Send `probe` through the test client; a stream is read to its first chunk, then dropped."""
    body = bytearray()
    with trio.CancelScope() as exchange_scope:
        connection = app.test_client().request(
            probe.target, method=probe.method, headers=Headers(list(probe.headers))
        )
        async with connection:
            await connection.send(probe.body)
            await connection.send_complete()
            with trio.move_on_after(ANSWER_TIMEOUT_S):
                try:
                    while True:
                        body += await connection.receive()
                        if _content_type(connection) == SSE_TYPE:
                            # Dropping it is what a client going away does: the app is cancelled.
                            exchange_scope.cancel()
                            break
                except trio.EndOfChannel:
                    pass
    status, headers = getattr(connection, "status_code", None), getattr(connection, "headers", None)
    assert status is not None, f"no answer within {ANSWER_TIMEOUT_S} s"
    assert headers is not None
    return Answer(status, headers, bytes(body), exchange_scope.cancel_called)


def _content_type(connection: object) -> str | None:
    headers = getattr(connection, "headers", None)
    return None if headers is None else headers.get("Content-Type")


def strict_json(body: bytes) -> Any:
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in a JSON answer: {body[:200]!r}")

    return json.loads(body, parse_constant=refuse)


def check_answer(relay: RunningRelay, probe: Probe, answer: Answer) -> None:
    assert answer.headers.get("Access-Control-Allow-Origin") == "*", answer.headers
    held = relay.services.held.statistics()
    assert (held.held_long_polls, held.open_streams) == (0, 0), "a finished request is still held"
    content_type = answer.headers.get("Content-Type")
    if answer.streamed:
        assert (answer.status, probe.path) == (200, "/events/stream")
        assert answer.body.startswith(b"retry: ")
        return
    if content_type == JSON_TYPE:
        strict_json(answer.body)
    if 200 <= answer.status < 300:
        return
    assert content_type == JSON_TYPE, (answer.status, content_type, answer.body[:200])
    error = strict_json(answer.body)
    assert isinstance(error, dict), error
    assert set(error) == {"error", "code"}, error
    assert isinstance(error["error"], str), error
    assert error["error"].strip(), error
    assert isinstance(error["code"], str), error
    assert SNAKE_CASE.fullmatch(error["code"]), error
    if answer.status >= 500:
        # The one 5xx a request may get: the contract's answer to more streams than the relay holds.
        assert (answer.status, error["code"], probe.path) == (503, "too_many_streams", "/events/stream"), (
            error
        )
        assert "Retry-After" in answer.headers


def published_id(probe: Probe, answer: Answer) -> int | None:
    """The event id of a publication the relay accepted, else None."""
    if probe.method != "POST" or probe.path not in PUBLISH_PATHS or answer.status != 200:
        return None
    body = strict_json(answer.body)
    assert body["status"] == "published", body
    assert isinstance(body["id"], int), body
    return int(body["id"])


# --- strategies ---

text = functools.partial(st.text, st.characters(codec="utf-8"))
header_text = text(max_size=40).map(lambda t: "".join(c for c in t if c.isprintable() or c == "\t"))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


number_texts = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats().map(repr),
    st.floats(min_value=0, max_value=0.2).map(str),
    st.sampled_from(ODD_NUMBERS),
)
# Cursors near the relay's clock: behind it, ahead within max_clock_skew_s, and beyond it.
cursor_texts = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6), st.integers(min_value=-(10**13), max_value=10**13)
).map(lambda offset: str(now_ms() + offset))
query_values = st.one_of(
    st.sampled_from([str(FACTION), str(OTHER_FACTION), ANON_KEY]),
    number_texts,
    cursor_texts,
    text(max_size=20),
)
query_keys = st.one_of(
    st.sampled_from(["faction_id", "since", "wait", "apikey", "api_key"]), text(max_size=8)
)


def encode_pair(key: str, value: str) -> str:
    return f"{quote(key, safe='')}={quote(value, safe='')}"


query_pieces = st.one_of(
    st.builds(encode_pair, query_keys, query_values),
    st.sampled_from(PERCENT_JUNK),
    st.sampled_from(["", "=", "faction_id", "faction_id=", "==", "faction_id=%FF", "since=%00"]),
)
chaotic_queries = st.lists(query_pieces, max_size=6).map("&".join)


def mostly(usable: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usable values three times in four, so that requests get past the first check to the later ones."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda n: junk if n == 0 else usable)


@st.composite
def events_queries(draw: st.DrawFn) -> str:
    """A query aimed at /events and /events/stream, usable more often than not."""
    pairs = [("faction_id", draw(mostly(st.sampled_from([str(FACTION), str(OTHER_FACTION)]), query_values)))]
    if draw(st.booleans()):
        pairs.append(("since", draw(mostly(cursor_texts, query_values))))
    if draw(st.booleans()):
        pairs.append(
            ("wait", draw(mostly(st.sampled_from(["0", "0.01", "0.04", "25", "1e9"]), number_texts)))
        )
    pieces = [encode_pair(*pair) for pair in draw(st.permutations(pairs))]
    return "&".join(pieces + draw(st.lists(query_pieces, max_size=2)))


# Numbers at the edges of what JSON, JavaScript and SQLite hold; NaN and the infinities separately.
EDGE_NUMBERS = (-0.0, 5e-324, 1.7976931348623157e308, 2**53 + 1, 2**63, -(2**63) - 1, 10**400)
NON_FINITE = (math.nan, math.inf, -math.inf)
finite_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EDGE_NUMBERS),
    text(max_size=12),
)
json_leaves = st.one_of(finite_json_leaves, st.floats(), st.sampled_from(NON_FINITE))


def json_trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


json_values = json_trees(json_leaves)
# Non-finite numbers included: the relay must refuse them as invalid_json, never fail on them.
publishable_leaves = json_leaves
publishable_data = mostly(
    st.one_of(
        st.lists(json_trees(publishable_leaves), max_size=3),
        st.dictionaries(text(max_size=8), json_trees(publishable_leaves), max_size=3),
    ),
    json_trees(publishable_leaves),
)
faction_values = st.one_of(
    st.sampled_from([FACTION, OTHER_FACTION]),
    st.sampled_from([str(FACTION), str(OTHER_FACTION)]),
    st.integers(min_value=1, max_value=2**31 - 1),
    st.integers(),
    st.floats(),
    st.sampled_from(ODD_NUMBERS),
    json_values,
)
key_values = st.one_of(
    st.just(ANON_KEY),
    st.sampled_from(["", ANON_KEY.upper(), ANON_KEY + "\x00", ANON_KEY + " ", "tëst"]),
    text(max_size=20),
    json_values,
)
type_values = st.one_of(
    st.sampled_from(
        ["hospital_update", "faction_members_update", "postgres_changes", "", "hospital_update "]
    ),
    text(max_size=20),
    json_values,
)


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A publication (or subscription) that would be accepted, with up to three fields spoilt."""
    payload: dict[str, Any] = {
        "faction_id": draw(
            mostly(
                st.sampled_from([FACTION, OTHER_FACTION, str(FACTION)]),
                st.integers(min_value=1, max_value=2**31 - 1),
            )
        ),
        "api_key": ANON_KEY,
        "type": draw(st.sampled_from(["hospital_update", "faction_members_update"])),
        "data": draw(publishable_data),
        "members": draw(publishable_data),
    }
    junk = {
        "faction_id": faction_values,
        "api_key": key_values,
        "type": type_values,
        "data": json_values,
        "members": json_values,
    }
    spoilt = mostly(st.just([]), st.lists(st.sampled_from(sorted(junk)), unique=True, min_size=1, max_size=3))
    for key in draw(spoilt):
        if draw(st.booleans()):
            del payload[key]
        else:
            payload[key] = draw(junk[key])
    payload.update(
        draw(st.dictionaries(text(max_size=8).filter(lambda k: k not in junk), json_values, max_size=2))
    )
    return payload


def encode_json(payload: Any, encoding: str) -> bytes:
    """`payload` as JSON text (NaN and Infinity included) in `encoding`; json.loads reads all four."""
    written = json.dumps(payload, ensure_ascii=encoding == "ascii")
    return written.encode("utf-8" if encoding == "ascii" else encoding, "surrogatepass")


json_bodies = st.builds(encode_json, payloads(), st.sampled_from(["ascii", "utf-8", "utf-16", "utf-32"]))


def padded_publication(size: int) -> bytes:
    """A valid publication of exactly `size` bytes, to land on either side of the body limits."""
    head = json.dumps({"faction_id": FACTION, "api_key": ANON_KEY, "type": "hospital_update"})[:-1]
    shell = f'{head}, "data": {{"pad": ""}}}}'
    return shell.replace('"pad": ""', '"pad": "' + "x" * (size - len(shell)) + '"').encode()


def deep_publication(depth: int, data: bool) -> bytes:
    """A publication whose data (or whole body) nests `depth` deep: around the recursion limit."""
    nested = b"[" * depth + b"]" * depth
    if not data:
        return nested
    head = json.dumps({"faction_id": FACTION, "api_key": ANON_KEY, "type": "hospital_update"})[:-1]
    return f'{head}, "data": '.encode() + nested + b', "members": ' + nested + b"}"


nested_bodies = st.builds(deep_publication, st.integers(min_value=1, max_value=5000), st.booleans())
other_bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.binary(max_size=40).map(lambda junk: b'{"faction_id": "' + junk + b'\xff\xfe", "api_key": "\xc3"}'),
    nested_bodies,
    st.sampled_from(BODY_SIZES).map(padded_publication),
    st.sampled_from(
        [b"NaN", b"1e999999", b'{"faction_id": 1e999999}', b'{"faction_id": ' + b"1" * 5000 + b"}"]
    ),
)
bodies = mostly(json_bodies, other_bodies)
headers_lists = st.lists(
    st.one_of(
        st.tuples(st.just("Content-Type"), st.one_of(st.sampled_from(CONTENT_TYPES), header_text)),
        st.tuples(
            st.just("Last-Event-ID"),
            st.one_of(cursor_texts, query_values, header_text).map(
                lambda value: "".join(c for c in value if c.isprintable())
            ),
        ),
        st.tuples(
            st.sampled_from(OTHER_HEADERS),
            header_text,
        ),
        st.tuples(st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True), header_text),
    ),
    max_size=5,
)


chaotic_paths = st.one_of(
    st.sampled_from(REAL_PATHS),
    st.sampled_from(REAL_PATHS).map(lambda p: p + "/"),
    st.sampled_from(REAL_PATHS).map(str.upper),
    text(max_size=30).map(lambda t: "/" + t.replace("?", "")),
    st.lists(st.sampled_from(PERCENT_JUNK), min_size=1, max_size=4).map(lambda junk: "/" + "".join(junk)),
    # The test client unquotes the path and then parses it as a URL, so one that unquotes to '//...'
    # would be taken for a host name and refused before it reached the relay.
).filter(lambda path: not unquote(path).startswith("//"))


@st.composite
def probes(draw: st.DrawFn) -> Probe:
    kind = draw(
        st.sampled_from(["poll", "stream", "subscribe", "publish", "publish", "plain", "chaos", "chaos"])
    )
    method, query, body = "GET", "", b""
    if kind in ("poll", "stream"):
        path, query = ("/events" if kind == "poll" else "/events/stream"), draw(events_queries())
    elif kind in ("subscribe", "publish"):
        method, body = "POST", draw(bodies)
        path = "/subscribe" if kind == "subscribe" else draw(st.sampled_from(PUBLISH_PATHS))
        if draw(st.booleans()):
            query = encode_pair("apikey", draw(st.one_of(st.just(ANON_KEY), query_values)))
    elif kind == "plain":
        path = draw(st.sampled_from(REAL_PATHS))
    else:
        method, query, body = draw(st.sampled_from(METHODS)), draw(chaotic_queries), draw(bodies)
        path = draw(chaotic_paths)
    headers = list(draw(headers_lists))
    if kind in ("subscribe", "publish") and draw(st.booleans()):
        headers.insert(0, ("Content-Type", "application/json"))
    if body and draw(st.booleans()):  # else the body arrives without a length, as a chunked one does
        headers.append(("Content-Length", str(len(body))))
    return Probe(method, f"{path}?{query}" if query else path, tuple(headers), body)


# --- the properties ---


@dataclass(frozen=True, slots=True)
class Snapshot:
    events: dict[int, list[tuple[int, int, str, str]]]  # faction -> (id, timestamp, type, data JSON)


async def snapshot(relay: RunningRelay) -> Snapshot:
    store = relay.store
    events = {}
    for faction_id in store.known_factions():
        found, _ = await store.read_since(faction_id, None)
        if found:
            events[faction_id] = [(e.id, e.timestamp, e.type, e.data_json) for e in found]
    return Snapshot(events)


async def seed(relay: RunningRelay, fake: FakeSupabase) -> None:
    """Two subscribed factions with events of varied shapes, as upstream would have stored them. Their
    rows are upstream's too, and stored before the subscription, so that no reconcile ever finds a
    difference (which would add events nobody published)."""
    for faction_id in (FACTION, OTHER_FACTION):
        rows = [{"id": faction_id * 10 + n, "faction_id": faction_id} for n in range(3)]
        for row in rows:
            fake.insert("war_calls", row, deliver=False)
        changes: list[tuple[str, Any]] = [
            ("postgres_changes", {"table": "war_calls", "eventType": "INSERT", "new": row, "old": {}})
            for row in rows
        ]
        changes.append(("hospital_update", {"members": [{"name": "Zoë ✓ \u2028", "until": 2**53}]}))
        changes.append(("faction_members_update", [[[[]]], {"": None}, -0.0, 1e300]))
        await relay.store.append_events(faction_id, changes)
        response = await relay.app.test_client().post(
            "/subscribe", json={"faction_id": faction_id, "api_key": ANON_KEY}
        )
        assert response.status_code == 200


def database_events(relay: RunningRelay) -> dict[int, list[tuple[int, int, str, str]]]:
    with sqlite3.connect(relay.services.config.storage.path) as database:
        rows = database.execute(
            "SELECT faction_id, id, timestamp, type, data FROM events ORDER BY id"
        ).fetchall()
    found: dict[int, list[tuple[int, int, str, str]]] = {}
    for faction_id, *event in rows:
        found.setdefault(faction_id, []).append(tuple(event))
    return found


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
async def test_no_request_breaks_the_relay_or_its_stored_events(
    make_config: Callable[..., Config], fake_upstream: FakeSupabase, config_name: str
) -> None:
    published: list[int] = []
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            relay: RunningRelay = await nursery.start(
                functools.partial(run_relay, make_config(CONFIGS[config_name]))
            )
            await seed(relay, fake_upstream)
            before = await snapshot(relay)
            ping = Probe("GET", "/ping", (), b"")

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
            @given(probe=probes())
            def any_request(probe: Probe) -> None:
                answer = trio.from_thread.run(exchange, relay.app, probe)
                check_answer(relay, probe, answer)
                if (event_id := published_id(probe, answer)) is not None:
                    published.append(event_id)
                still = trio.from_thread.run(exchange, relay.app, ping)
                assert (still.status, strict_json(still.body)["status"]) == (200, "ok")

            await trio.to_thread.run_sync(any_request)
            after = await snapshot(relay)
            relay.stop()
    for faction_id, events in before.events.items():
        assert after.events[faction_id][: len(events)] == events, (
            f"faction {faction_id}'s stored events changed"
        )
    added = [
        event
        for faction_id, events in after.events.items()
        for event in events[len(before.events.get(faction_id, [])) :]
    ]
    assert sorted(event[0] for event in added) == sorted(published), "events appeared that nobody published"
    assert database_events(relay) == after.events, "what the relay serves is not what it committed"


# --- known bugs, found by the property above; each pins the exact request ---


@pytest.mark.parametrize("data", [b"[NaN]", b'{"x": Infinity}', b"[-Infinity]", b"[1e999]"])
async def test_publishing_non_finite_numbers_is_refused(relay: RunningRelay, data: bytes) -> None:
    client = relay.app.test_client()
    await client.post("/subscribe", json={"faction_id": FACTION, "api_key": ANON_KEY})
    body = (
        b'{"faction_id": 46666, "api_key": "test-anon-key", "type": "hospital_update", "data": ' + data + b"}"
    )
    response = await client.post("/events", data=body, headers={"Content-Type": "application/json"})
    error = await response.get_json()
    assert (response.status_code, set(error)) == (400, {"error", "code"})
    assert error["code"] in {"invalid_json", "invalid_data"}
