"""Hostile HTTP clients for tests/test_hostile.py (issue 13): members on a flaky phone network, scanners,
attackers.

What a client does is data: a `Case` is the bytes it sends in steps, what it waits for after each step,
and how it vanishes (tests/helpers/hostile_cases.py and hostile_h2.py build them). `run_case` is the only
code with a socket; every error it meets is the client's own business, since a hostile client expects
to be cut off.
"""

from __future__ import annotations

import enum
import json
import random
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

# What a client waits at most for an answer it reads before vanishing (a batch keeps the relay's one
# core busy, so an answer can take most of a second), and for the server's close, when it waits for
# one or after its half-close (a kept-alive connection is not closed for seconds): a batch takes one
# or two seconds.
ANSWER_BOUND_S = 1.0
CLOSE_BOUND_S = 0.5
# How long one case may take in all (its own reads are bounded above; this catches a stuck send).
CASE_LIMIT_S = 5.0
# Receive buffers that make a big answer wait in the server's send path ("while answered").
TINY_RCVBUF = (1024, 2048, 4096)
KEPT_BYTES = 512  # of each answer, for the summary and the h2c check
CLIENT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Vanish(enum.StrEnum):
    FIN = "fin"  # close(); the kernel sends RST instead when answer bytes lie unread, as for any client
    RST = "rst"  # SO_LINGER 0, then close(): RST at once
    HALF_CLOSE = "half-close"  # shutdown(SHUT_WR), read until the server closes (bounded), close


class Stage(enum.StrEnum):
    MID_HEAD = "mid-head"
    AFTER_HEAD = "after-head"  # a body declared, none sent
    MID_BODY = "mid-body"
    AFTER_REQUEST = "after-request"
    WHILE_ANSWERED = "while-answered"  # tiny receive buffer, big answers pipelined
    HELD = "held"  # mid SSE stream or mid long-poll
    CUT = "cut"  # the other families: their bytes cut at a random point
    WHOLE = "whole"


class Until(enum.StrEnum):
    NOTHING = "nothing"
    DELAY = "delay"
    FIRST_BYTE = "first-byte"
    HEAD = "head"  # an HTTP/1 answer's head (the 101 of an h2c upgrade, say)
    EOF = "eof"


@dataclass(frozen=True, slots=True)
class Step:
    data: bytes
    until: Until = Until.NOTHING
    delay_s: float = 0.0
    bound_s: float | None = None  # None: ANSWER_BOUND_S for an answer, CLOSE_BOUND_S for the close

    def describe(self) -> str:
        return f"{self.until}({self.delay_s * 1000:.1f}ms)" if self.until is Until.DELAY else str(self.until)


@dataclass(frozen=True, slots=True)
class Case:
    number: int
    family: str
    label: str
    stage: Stage
    vanish: Vanish
    steps: tuple[Step, ...]
    rcvbuf: int | None = None

    def __str__(self) -> str:
        sent = sum(len(step.data) for step in self.steps)
        waits = ",".join(step.describe() for step in self.steps)
        buffer = f" rcvbuf={self.rcvbuf}" if self.rcvbuf else ""
        return (
            f"#{self.number} {self.family} {self.label} stage={self.stage} vanish={self.vanish} "
            f"sent={sent}B waits={waits}{buffer}"
        )


@dataclass(slots=True)
class Outcome:
    case: Case
    received: bytes = b""  # the first KEPT_BYTES
    received_bytes: int = 0
    closed_by_server: bool = False
    client_error: str | None = None
    timed_out: bool = False

    def record(self, chunk: bytes) -> None:
        if len(self.received) < KEPT_BYTES:
            self.received = (self.received + chunk)[:KEPT_BYTES]
        self.received_bytes += len(chunk)

    @property
    def status(self) -> int | None:
        """The status of the first HTTP/1 answer the client read, if any."""
        parts = self.received.split(b"\r\n", 1)[0].split(b" ")
        return (
            int(parts[1])
            if parts[0].startswith(b"HTTP/1.") and len(parts) > 1 and parts[1].isdigit()
            else None
        )

    @property
    def status_line(self) -> str:
        line = self.received.split(b"\r\n", 1)[0]
        return (
            line.decode("latin-1") if line.startswith(b"HTTP/") else ("(h2 or other)" if line else "(none)")
        )


@dataclass(frozen=True, slots=True)
class Target:
    """The relay under attack, and what the cases need to know about it."""

    host: str
    port: int
    faction_id: int  # subscribed; hostile publishes land here
    quiet_faction_id: int  # subscribed and never written to, so long-polls and streams on it are held
    api_key: str
    max_body_bytes: int
    publish_max_body_bytes: int
    extra_headers: tuple[tuple[str, str], ...] = ()


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload).encode()


def random_wait(rng: random.Random) -> tuple[Until, float]:
    """What a vanishing client waits for first: nothing, a few ms (issue 13's k * 0.5 ms), the first
    byte of an answer, or the server's close."""
    roll = rng.random()
    if roll < 0.25:
        return Until.NOTHING, 0.0
    if roll < 0.6:
        return Until.DELAY, rng.uniform(0, 0.02)
    if roll < 0.8:
        return Until.FIRST_BYTE, 0.0
    return Until.EOF, 0.0


def random_step(data: bytes, rng: random.Random) -> Step:
    until, delay_s = random_wait(rng)
    return Step(data, until, delay_s)


def _cut(rng: random.Random, steps: Sequence[Step]) -> tuple[Step, ...]:
    """The steps up to a random byte of the last one with data (the earlier ones are whole)."""
    last = max(i for i, step in enumerate(steps) if step.data)
    step = steps[last]
    cut = Step(step.data[: rng.randrange(1, len(step.data)) if len(step.data) > 1 else 0], *random_wait(rng))
    return (*steps[:last], cut)


def finish(rng: random.Random, stage: Stage, steps: Sequence[Step]) -> tuple[Step, ...]:
    return _cut(rng, steps) if stage is Stage.CUT else tuple(steps)


# ---- the one part with sockets ------------------------------------------------------------------------


async def _connect(host: str, port: int, rcvbuf: int | None) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:  # before connect(), so the window it offers is small from the first segment
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _read(stream: trio.SocketStream, outcome: Outcome, until: Until, bound_s: float) -> None:
    before = outcome.received_bytes
    with trio.move_on_after(bound_s):
        while not (
            (until is Until.FIRST_BYTE and outcome.received_bytes > before)
            or (until is Until.HEAD and b"\r\n\r\n" in outcome.received)
        ):
            chunk = await stream.receive_some(65536)
            if not chunk:
                outcome.closed_by_server = True
                return
            outcome.record(chunk)


async def _vanish(stream: trio.SocketStream, vanish: Vanish, outcome: Outcome) -> None:
    if vanish is Vanish.RST:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif vanish is Vanish.HALF_CLOSE:
        await stream.send_eof()
        if not outcome.closed_by_server:
            await _read(stream, outcome, Until.EOF, CLOSE_BOUND_S)
    stream.socket.close()


async def run_case(case: Case, host: str, port: int, *, limit_s: float = CASE_LIMIT_S) -> Outcome:
    """Play `case` against host:port. Never raises for what happens on the wire."""
    outcome = Outcome(case)
    with trio.move_on_after(limit_s) as scope:
        try:
            stream = await _connect(host, port, case.rcvbuf)
        except OSError as exc:
            outcome.client_error = f"connect: {exc!r}"
            return outcome
        try:
            for step in case.steps:
                if step.data:
                    await stream.send_all(step.data)
                if step.until is Until.DELAY:
                    await trio.sleep(step.delay_s)
                elif step.until is not Until.NOTHING and not outcome.closed_by_server:
                    bound_s = step.bound_s or (CLOSE_BOUND_S if step.until is Until.EOF else ANSWER_BOUND_S)
                    await _read(stream, outcome, step.until, bound_s)
            await _vanish(stream, case.vanish, outcome)
        except CLIENT_ERRORS as exc:
            outcome.client_error = repr(exc)
        finally:
            stream.socket.close()
    outcome.timed_out = scope.cancelled_caught
    return outcome


async def run_cases(
    cases: Sequence[Case], host: str, port: int, *, limit_s: float = CASE_LIMIT_S
) -> list[Outcome]:
    """All of `cases` at once, each under its own limit."""
    outcomes: list[Outcome] = []

    async def play(case: Case) -> None:
        outcomes.append(await run_case(case, host, port, limit_s=limit_s))

    async with trio.open_nursery() as nursery:
        for case in cases:
            nursery.start_soon(play, case)
    return sorted(outcomes, key=lambda outcome: outcome.case.number)


def issue_13_reproducer(host: str, port: int) -> int:
    """The script filed in issue 13, as filed (only the address is a parameter), blocking: run it in a
    thread. Returns how many of its 40 connections it made before the relay stopped accepting them."""
    made = 0
    try:
        for k in range(40):
            s = socket.create_connection((host, port))
            s.sendall(
                b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100000\r\n\r\n{"faction'
            )
            time.sleep(k * 0.0005)
            s.close()
            made += 1
    except OSError:
        pass  # refused: the relay is gone, which the caller's checks report
    return made


@dataclass(slots=True)
class Tally:
    """What the clients saw, for the summary: answers by status line, and errors on their side."""

    cases: int = 0
    status_lines: dict[str, int] = field(default_factory=dict)
    client_errors: int = 0
    timed_out: int = 0

    def add(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            self.cases += 1
            line = outcome.status_line
            self.status_lines[line] = self.status_lines.get(line, 0) + 1
            if outcome.status is not None:
                self.statuses[outcome.status] = self.statuses.get(outcome.status, 0) + 1
            self.client_errors += outcome.client_error is not None
            self.timed_out += outcome.timed_out

    statuses: dict[int, int] = field(default_factory=dict)

    def answered(self, status: int) -> int:
        """How many clients saw an HTTP/1 answer with `status` first."""
        return self.statuses.get(status, 0)

    def __str__(self) -> str:
        top = sorted(self.status_lines.items(), key=lambda item: -item[1])[:12]
        lines = ", ".join(f"{line!r}: {n}" for line, n in top)
        return f"{self.cases} cases; client-side errors {self.client_errors}; timed out {self.timed_out}; answers {lines}"
