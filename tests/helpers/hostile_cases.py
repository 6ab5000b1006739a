"""The hostile tier's cases, built from one seeded random source (pure: the same seed gives the same
cases): every route and method the relay serves, each early answer, each stage to vanish at and each
way of vanishing; pipelining, HTTP/1.0, `Expect: 100-continue`, h2c, garbage and floods; HTTP/2 comes
from tests/helpers/hostile_h2.py."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.helpers import h2_frames as h2
from tests.helpers.hostile_clients import (
    TINY_RCVBUF,
    Case,
    Stage,
    Step,
    Target,
    Until,
    Vanish,
    finish,
    json_bytes,
    random_step,
)
from tests.helpers.hostile_h2 import H2_SCRIPTS, h2_case

UNKNOWN_FACTION = 999_999  # no one subscribes it
# Bodies the relay's body timeout (BODY_TIMEOUT_S in relay/http/api.py, 10 s) cuts off, and when to vanish
# around it.
BODY_TIMEOUT_S = 10.0
BODY_ROUTES = ("/subscribe", "/events", "/hospital", "/faction-members")  # the routes that read a body
SLOW_CASE_NUMBERS = 100_000  # where the body-timeout cases are numbered from, apart from the others


@dataclass(frozen=True, slots=True)
class Scenario:
    """One route and method with the answer it gets when the request is whole."""

    label: str
    method: str
    target: str
    body: bytes = b""
    declared: int | None = None  # a Content-Length above the body actually sent (413)
    held: bool = False
    big: bool = False


def http1_scenarios(t: Target) -> list[Scenario]:
    """Every route and method the relay serves (relay/http/api.py, relay/http/events.py, openapi.json), with
    each early answer the tier is about; 429 needs its own relay (tests/test_hostile.py)."""
    f, quiet, key = t.faction_id, t.quiet_faction_id, t.api_key
    publish = {"api_key": key, "faction_id": f, "type": "hospital_update", "data": {"hostile": True}}
    return [
        Scenario("GET /ping 200", "GET", "/ping"),
        Scenario("GET /health 200", "GET", "/health"),
        Scenario("GET /status 200", "GET", "/status", big=True),
        Scenario("GET /metrics 200", "GET", "/metrics", big=True),
        Scenario("GET / 200", "GET", "/", big=True),
        Scenario("GET /client.js 200", "GET", "/client.js", big=True),
        Scenario("GET /openapi.json 200", "GET", "/openapi.json", big=True),
        Scenario("POST /subscribe 200", "POST", "/subscribe", json_bytes({"faction_id": f, "api_key": key})),
        Scenario("POST /subscribe 400", "POST", "/subscribe", b'{"faction'),
        Scenario(
            "POST /subscribe 401", "POST", "/subscribe", json_bytes({"faction_id": f, "api_key": "nope"})
        ),
        Scenario("POST /subscribe 413", "POST", "/subscribe", b'{"faction', declared=100_000),
        Scenario("GET /state 200", "GET", f"/state?faction_id={f}"),
        Scenario("GET /state 400", "GET", "/state?faction_id=x"),
        Scenario("GET /events 200", "GET", f"/events?faction_id={f}&since=0", big=True),
        Scenario("GET /events 400", "GET", f"/events?faction_id={f}&since=soon"),
        Scenario("GET /events 404", "GET", f"/events?faction_id={UNKNOWN_FACTION}"),
        Scenario("GET /events?wait= long-poll", "GET", f"/events?faction_id={quiet}&wait=30", held=True),
        Scenario("GET /events/stream SSE", "GET", f"/events/stream?faction_id={quiet}", held=True),
        Scenario("GET /events/stream 404", "GET", f"/events/stream?faction_id={UNKNOWN_FACTION}"),
        Scenario("POST /events 200", "POST", "/events", json_bytes(publish)),
        Scenario("POST /events 400", "POST", "/events", b"[1, 2"),
        Scenario("POST /events 401", "POST", "/events", json_bytes({**publish, "api_key": "nope"})),
        Scenario("POST /events 413", "POST", "/events", b'{"data": "', declared=t.publish_max_body_bytes + 1),
        Scenario("OPTIONS /events 200", "OPTIONS", "/events"),
        Scenario("OPTIONS /events/stream 200", "OPTIONS", "/events/stream"),
        Scenario("OPTIONS /subscribe", "OPTIONS", "/subscribe"),
        Scenario("PUT /events 405", "PUT", "/events", b"{}"),
        Scenario("POST /events/stream 405", "POST", "/events/stream", b"{}"),
        Scenario("DELETE /ping 405", "DELETE", "/ping"),
        Scenario("POST /status 405", "POST", "/status", b"{}"),
        Scenario("POST /hospital 200", "POST", "/hospital", json_bytes({**publish, "data": [1, 2]})),
        Scenario("POST /hospital 413", "POST", "/hospital", b'{"data": [', declared=100_000),
        Scenario(
            "POST /faction-members 401",
            "POST",
            "/faction-members",
            json_bytes({"faction_id": f, "members": []}),
        ),
        Scenario("GET /nope 404", "GET", "/nope"),
        Scenario("POST /no/such/path 404", "POST", "/no/such/path", b'{"a": 1}'),
    ]


def rate_limited_scenarios(t: Target) -> list[Scenario]:
    """The routes behind the per-address rate limit (relay/http/admission.py RATE_LIMITED_PATHS)."""
    limited = ("/subscribe", "/events", "/events/stream", "/state", "/hospital", "/faction-members")
    return [
        s
        for s in http1_scenarios(t)
        if s.target.partition("?")[0] in limited and s.method != "OPTIONS" and "405" not in s.label
    ]


def http1_request(
    rng: random.Random, t: Target, s: Scenario, *, need_body: bool = False, extra: Sequence[str] = ()
) -> tuple[bytes, bytes]:
    """The head and the body as sent on the wire: HTTP/1.1 or 1.0, Content-Length or chunked, the
    declared length above what is sent for a 413. `need_body` gives a bodiless route a body."""
    version = "HTTP/1.0" if rng.random() < 0.2 else "HTTP/1.1"
    body = s.body
    if need_body and not body:
        body = b'{"x": "' + b"a" * rng.randint(2, 200) + b'"}'
    if s.declared is not None:  # more of the body, never all of it
        body += b"1" * rng.randint(0, min(600, s.declared - len(body) - 1))
    lines = [f"{s.method} {s.target} {version}", "Host: relay.test", *extra]
    lines += [f"{name}: {value}" for name, value in t.extra_headers]
    if rng.random() < 0.15:
        lines.append("Connection: close")
    elif version == "HTTP/1.0" and rng.random() < 0.3:
        lines.append("Connection: keep-alive")
    if "stream" in s.target:
        lines.append("Accept: text/event-stream")
    if body:
        lines.append("Content-Type: application/json")
        if rng.random() < 0.2:
            lines.append("Transfer-Encoding: chunked")
            if s.declared is not None:
                body = f"{s.declared:x}\r\n".encode() + body
            else:
                body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {s.declared if s.declared is not None else len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body


def _h1_case(t: Target, s: Scenario, stage: Stage, vanish: Vanish, number: int, rng: random.Random) -> Case:
    head, body = http1_request(rng, t, s, need_body=stage in (Stage.AFTER_HEAD, Stage.MID_BODY))
    rcvbuf = None
    if stage is Stage.MID_HEAD:
        steps: tuple[Step, ...] = (random_step(head[: rng.randrange(1, len(head))], rng),)
    elif stage is Stage.AFTER_HEAD:
        steps = (random_step(head, rng),)
    elif stage is Stage.MID_BODY:  # head and body in two segments, as a slow uplink sends them
        steps = (
            Step(head, Until.DELAY, rng.uniform(0, 0.005)),
            random_step(body[: rng.randrange(1, len(body))], rng),
        )
    elif stage is Stage.AFTER_REQUEST:
        steps = (random_step(head + body, rng),)
    elif stage is Stage.WHILE_ANSWERED:
        rcvbuf = rng.choice(TINY_RCVBUF)
        repeat = rng.randint(2, 6) if s.big else rng.randint(8, 40)
        until, delay_s = rng.choice([(Until.NOTHING, 0.0), (Until.DELAY, 0.01), (Until.FIRST_BYTE, 0.0)])
        steps = (Step((head + body) * repeat, until, delay_s),)
    else:  # HELD: the answer's head (a stream's) or a moment (a long-poll), then gone mid-hold
        until = Until.HEAD if "stream" in s.target else Until.NOTHING
        steps = (Step(head + body, until), Step(b"", Until.DELAY, rng.uniform(0, 0.3)))
    return Case(number, "h1", s.label, stage, vanish, steps, rcvbuf)


def _expect_case(
    t: Target, s: Scenario, stage: Stage, vanish: Vanish, number: int, rng: random.Random
) -> Case:
    """`Expect: 100-continue`: the head, then the 100 (or an early answer), then some of the body."""
    head, body = http1_request(rng, t, s, extra=["Expect: 100-continue"])
    sent = body if stage is Stage.AFTER_REQUEST else body[: rng.randrange(0, len(body))]
    steps = (Step(head, Until.FIRST_BYTE, bound_s=0.5), random_step(sent, rng))
    return Case(number, "expect", s.label, stage, vanish, steps)


def _pipeline_case(t: Target, stage: Stage, vanish: Vanish, number: int, rng: random.Random) -> Case:
    chosen = [s for s in rng.sample(http1_scenarios(t), rng.randint(2, 6)) if not s.held]
    data = b"".join(b"".join(http1_request(rng, t, s)) for s in chosen)
    rcvbuf = rng.choice((None, *TINY_RCVBUF))
    label = "+".join(s.label.split(" ")[1] for s in chosen)
    return Case(
        number, "pipeline", label, stage, vanish, finish(rng, stage, [random_step(data, rng)]), rcvbuf
    )


H2C_REQUESTS = (
    ("GET /ping +HTTP2-Settings", "GET", "/ping", True),
    ("GET /ping no HTTP2-Settings", "GET", "/ping", False),
    ("GET /openapi.json +HTTP2-Settings", "GET", "/openapi.json", True),
    ("GET /events/stream +HTTP2-Settings", "GET", "/events/stream?faction_id={quiet}", True),
    ("OPTIONS /events no HTTP2-Settings", "OPTIONS", "/events", False),
    ("POST /subscribe with a body", "POST", "/subscribe", True),
)


def _h2c_case(
    t: Target,
    request: tuple[str, str, str, bool],
    stage: Stage,
    vanish: Vanish,
    number: int,
    rng: random.Random,
) -> Case:
    """`Upgrade: h2c`: the relay should answer over HTTP/1.1 as if there were no Upgrade (never 101);
    whatever it answered, the client then speaks HTTP/2 on the socket."""
    label, method, path, with_settings = request
    connection = "Upgrade, HTTP2-Settings" if with_settings else "Upgrade"
    extra = ["Upgrade: h2c", f"Connection: {connection}"]
    if with_settings:
        extra.append(f"HTTP2-Settings: {h2.http2_settings_header()}")
    body = json_bytes({"faction_id": t.faction_id, "api_key": t.api_key}) if method == "POST" else b""
    scenario = Scenario(label, method, path.format(quiet=t.quiet_faction_id), body)
    head, wire_body = http1_request(rng, t, scenario, extra=extra)
    follow_up = rng.choice(
        [
            h2.data_frame(1, b"late", end_stream=True),  # on the upgraded stream, already answered
            h2.rst_stream(1),
            h2.headers_frame(3, h2.request_headers("GET", "/ping")) + h2.data_frame(3, b"x"),
            b"",
        ]
    )
    steps = [Step(head + wire_body, Until.HEAD), random_step(h2.PREFACE + h2.settings() + follow_up, rng)]
    return Case(number, "h2c", label, stage, vanish, finish(rng, stage, steps))


def _odd_case(t: Target, kind: str, stage: Stage, vanish: Vanish, number: int, rng: random.Random) -> Case:
    """Garbage, a 20 KB request line, header floods below and above the relay's 16 KB head limit."""
    host = b"Host: relay.test\r\n"
    if kind == "garbage":
        data = rng.randbytes(rng.randint(1, 4096))
    elif kind == "garbage after a request line":
        data = b"GET /ping HTTP/1.1\r\n" + rng.randbytes(rng.randint(1, 4096))
    elif kind == "20 KB request line":
        data = b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + host + b"\r\n"
    else:  # header floods: "N headers"
        count = int(kind.split()[0])
        data = (
            b"GET /ping HTTP/1.1\r\n" + host + b"".join(b"X-H%d: v\r\n" % n for n in range(count)) + b"\r\n"
        )
    return Case(number, "odd", kind, stage, vanish, finish(rng, stage, [random_step(data, rng)]))


ODD_KINDS = ("garbage", "garbage after a request line", "20 KB request line", "200 headers", "3000 headers")
CaseBuilder = Callable[[int, random.Random], Case]


def _builders(t: Target, scenarios: Sequence[Scenario], *, everything: bool) -> list[CaseBuilder]:
    builders: list[CaseBuilder] = []
    h1_stages = [Stage.MID_HEAD, Stage.AFTER_HEAD, Stage.MID_BODY, Stage.AFTER_REQUEST, Stage.WHILE_ANSWERED]
    for vanish in Vanish:
        for s in scenarios:
            for stage in [*h1_stages, *([Stage.HELD] if s.held else [])]:
                builders.append(functools.partial(_h1_case, t, s, stage, vanish))
        if not everything:
            continue
        for s in scenarios:
            if s.method == "POST" and s.body and "405" not in s.label:
                for stage in (Stage.MID_BODY, Stage.AFTER_REQUEST):
                    builders.append(functools.partial(_expect_case, t, s, stage, vanish))
        for stage in (Stage.CUT, Stage.WHOLE):
            builders.append(functools.partial(_pipeline_case, t, stage, vanish))
            builders += [functools.partial(_h2c_case, t, request, stage, vanish) for request in H2C_REQUESTS]
            builders += [functools.partial(h2_case, t, name, stage, vanish) for name in H2_SCRIPTS]
            builders += [functools.partial(_odd_case, t, kind, stage, vanish) for kind in ODD_KINDS]
    return builders


def hostile_cases(seed: int, count: int, t: Target, *, rate_limited_only: bool = False) -> list[Case]:
    """`count` cases: every combination of (route or script, stage, vanishing style) once before any
    comes again, in an order and with details (framing, version, waits, cut points) drawn from `seed`."""
    rng = random.Random(seed)
    scenarios = rate_limited_scenarios(t) if rate_limited_only else http1_scenarios(t)
    builders = _builders(t, scenarios, everything=not rate_limited_only)
    rng.shuffle(builders)
    return [builders[n % len(builders)](n, rng) for n in range(count)]


def body_timeout_cases(seed: int, t: Target) -> list[Case]:
    """Bodies that stop arriving: the relay answers 408 after its body timeout. The client vanishes
    just before, around or after it, or once it has read the 408. One per route and vanishing style."""
    rng = random.Random(seed)
    routes = {s.target: s for s in http1_scenarios(t) if s.method == "POST" and s.target in BODY_ROUTES}
    cases: list[Case] = []
    for vanish in Vanish:
        for s in routes.values():
            declared = min(len(s.body) + 400, t.max_body_bytes)
            partial = Scenario(
                f"{s.method} {s.target} 408", s.method, s.target, s.body[:5], declared=declared
            )
            head, body = http1_request(rng, t, partial)
            until, delay_s = rng.choice(
                [
                    (Until.DELAY, rng.uniform(BODY_TIMEOUT_S - 0.5, BODY_TIMEOUT_S + 0.5)),
                    (Until.FIRST_BYTE, 0.0),
                ]
            )
            steps = (Step(head + body, until, delay_s, bound_s=BODY_TIMEOUT_S + 2),)
            number = SLOW_CASE_NUMBERS + len(cases)
            cases.append(Case(number, "h1", partial.label, Stage.MID_BODY, vanish, steps))
    return cases
