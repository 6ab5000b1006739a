"""The HTTP/2 clients of the hostile tier: prior knowledge (the preface, then frames from
tests/helpers/h2_frames.py) with requests answered early, floods, broken priority trees, held
streams. Pure: each script gives the steps of a `Case`."""

from __future__ import annotations

import random
from collections.abc import Callable

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

# A script: the steps after the preface, and the receive buffer the client asks for (None: the default).
H2Script = Callable[[Target, random.Random], tuple[list[Step], int | None]]


def _h2_opening() -> bytes:
    return h2.PREFACE + h2.settings()


def _h2_closed_stream(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    first = Step(_h2_opening() + h2.headers_frame(1, h2.request_headers("GET", "/ping")), Until.FIRST_BYTE)
    return [first, random_step(h2.data_frame(1, b"late", end_stream=rng.random() < 0.5), rng)], None


def _h2_partial_body(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    block = h2.request_headers("POST", "/subscribe", [("content-length", "100000")])
    frames = h2.headers_frame(1, block, end_stream=False) + h2.data_frame(1, b'{"fa')
    return [random_step(_h2_opening() + frames, rng)], None


def _h2_data_after_early_answer(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    """A body the relay refuses (413) or does not want (404, /ping) before it has arrived, whose next
    DATA frame comes once the answer has gone."""
    method, path = rng.choice([("POST", "/subscribe"), ("POST", "/no/such/path"), ("GET", "/ping")])
    block = h2.request_headers(method, path, [("content-length", "100000")])
    first = h2.headers_frame(1, block, end_stream=False) + h2.data_frame(1, b'{"fa')
    steps = [Step(_h2_opening() + first, Until.DELAY, rng.uniform(0.05, 0.3))]
    return [*steps, random_step(h2.data_frame(1, b"ction", end_stream=rng.random() < 0.5), rng)], None


def _h2_publish(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    body = json_bytes(
        {"api_key": t.api_key, "faction_id": t.faction_id, "type": "hospital_update", "data": {}}
    )
    block = h2.request_headers("POST", "/events", [("content-length", str(len(body)))])
    frames = h2.headers_frame(1, block, end_stream=False) + h2.data_frame(1, body, end_stream=True)
    return [random_step(_h2_opening() + frames, rng)], None


def _h2_priority_flood(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    return [random_step(_h2_opening() + h2.priority_flood(1001), rng)], None


def _h2_dependency_chain(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    return [random_step(_h2_opening() + h2.dependency_chain(990), rng)], None


def _h2_continuation_flood(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    return [random_step(_h2_opening() + h2.continuation_flood(1, rng.randint(500, 3000)), rng)], None


def _h2_big_answers(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    block = h2.request_headers("GET", "/openapi.json")
    frames = b"".join(h2.headers_frame(2 * n + 1, block) for n in range(rng.randint(1, 8)))
    return [Step(_h2_opening() + frames, Until.FIRST_BYTE)], rng.choice(TINY_RCVBUF)


def _h2_held(path: str) -> H2Script:
    def script(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
        block = h2.request_headers("GET", path.format(quiet=t.quiet_faction_id))
        steps = [
            Step(_h2_opening() + h2.headers_frame(1, block)),
            Step(b"", Until.DELAY, rng.uniform(0, 0.3)),
        ]
        return steps, None

    return script


def _h2_control_frames(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    frames = (
        h2.headers_frame(1, h2.request_headers("GET", "/status"))
        + h2.rst_stream(1)
        + h2.window_update(0, 0)
        + h2.ping() * rng.randint(1, 200)
        + h2.goaway(rng.randint(0, 9))
    )
    return [random_step(_h2_opening() + frames, rng)], None


def _h2_garbage(t: Target, rng: random.Random) -> tuple[list[Step], int | None]:
    return [random_step(_h2_opening() + rng.randbytes(rng.randint(1, 2000)), rng)], None


H2_SCRIPTS: dict[str, H2Script] = {
    "GET /ping then DATA on its closed stream": _h2_closed_stream,
    "POST /subscribe 413 partial DATA": _h2_partial_body,
    "DATA after an early answer": _h2_data_after_early_answer,
    "POST /events publish": _h2_publish,
    "1001 PRIORITY frames": _h2_priority_flood,
    "990-long dependency chain": _h2_dependency_chain,
    "CONTINUATION flood": _h2_continuation_flood,
    "big answers, tiny window": _h2_big_answers,
    "SSE held": _h2_held("/events/stream?faction_id={quiet}"),
    "long-poll held": _h2_held("/events?faction_id={quiet}&wait=30"),
    "RST, WINDOW_UPDATE 0, PINGs, GOAWAY": _h2_control_frames,
    "garbage frames": _h2_garbage,
}


def h2_case(t: Target, name: str, stage: Stage, vanish: Vanish, number: int, rng: random.Random) -> Case:
    steps, rcvbuf = H2_SCRIPTS[name](t, rng)
    return Case(number, "h2", name, stage, vanish, finish(rng, stage, steps), rcvbuf)
