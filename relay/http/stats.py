"""Counts of what the HTTP side answered: responses by route and status, latency per route, and
polls by how they ended. Plain integers on the request path; `/metrics` reads `statistics()`.

The route is the path when the relay serves it and "other" otherwise, and the method one the relay
answers or "other", so that scanners probing random paths and methods cannot make the metrics grow.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from enum import StrEnum

OTHER_ROUTE = "other"
OTHER_METHOD = "other"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})
# The route a long-poll's latency is kept under: it is held up to `wait=` seconds by design, and
# mixing it with plain polls would hide a slow plain poll.
LONG_POLL_ROUTE = "/events?wait"
# Seconds; from a plain poll answered from memory (well under a millisecond) up to a long-poll's
# `limits.long_poll_max_wait_s` (30 s by default).
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class PollKind(StrEnum):
    POLL = "poll"
    LONG_POLL = "long_poll"


class PollOutcome(StrEnum):
    EVENTS = "events"  # answered with at least one event
    EMPTY = "empty"  # answered without (a long-poll: its wait ran out, or the relay was stopping)
    HUNG_UP = "hung_up"  # a held long-poll whose client went away
    REFUSED = "refused"  # a 4xx answer
    FAILED = "failed"  # a 5xx answer


@dataclass(frozen=True, slots=True)
class Histogram:
    buckets: tuple[float, ...]  # upper bounds; +Inf is implied
    counts: list[int]  # per bucket, not cumulative; the last one is above every bound
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class HttpStatistics:
    responses: dict[tuple[str, str, int], int]  # (method, route, status) -> answers
    latency: dict[
        tuple[str, str], Histogram
    ]  # (method, route) -> seconds from request to the end of the answer
    polls: dict[tuple[PollKind, PollOutcome], int]
    streams_opened: int


class _Latency:
    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    open_connections: int
    max_connections: int
    accepted: int
    vanished: int  # clients that went away mid-request or mid-answer (reset, end of stream, broken pipe)
    stalled: int  # connections cut because their reader took nothing for a while
    failed: int  # connections closed by a failure while serving them (logged with its traceback)
    http2_refused: int  # HTTP/2 prior-knowledge prefaces, answered 505
    accept_errors: int  # accept() failures for want of descriptors or memory


class ConnectionCounters:
    """Bumped by `relay.http.server`'s connections, one plain integer each."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open_connections = 0
        self.accepted = 0
        self.vanished = 0
        self.stalled = 0
        self.failed = 0
        self.http2_refused = 0
        self.accept_errors = 0

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            self.open_connections,
            self.max_connections,
            self.accepted,
            self.vanished,
            self.stalled,
            self.failed,
            self.http2_refused,
            self.accept_errors,
        )


class HttpCounters:
    def __init__(self, max_connections: int = 0) -> None:
        self.connections = ConnectionCounters(max_connections)
        self._responses: dict[tuple[str, str, int], int] = {}
        self._latency: dict[tuple[str, str], _Latency] = {}
        self._polls: dict[tuple[PollKind, PollOutcome], int] = {}
        self._streams_opened = 0

    def answered(self, method: str, route: str, status: int, seconds: float | None) -> None:
        """One response; `seconds` is None for an answer without a meaningful duration (a stream)."""
        if method not in KNOWN_METHODS:
            method = OTHER_METHOD
        key = (method, route, status)
        self._responses[key] = self._responses.get(key, 0) + 1
        if seconds is not None:
            latency = self._latency.get((method, route))
            if latency is None:
                latency = self._latency[method, route] = _Latency()
            latency.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            latency.sum_s += seconds

    def polled(self, kind: PollKind, outcome: PollOutcome) -> None:
        key = (kind, outcome)
        self._polls[key] = self._polls.get(key, 0) + 1

    def stream_opened(self) -> None:
        self._streams_opened += 1

    def statistics(self) -> HttpStatistics:
        return HttpStatistics(
            responses=dict(self._responses),
            latency={
                where: Histogram(LATENCY_BUCKETS_S, list(latency.counts), latency.sum_s)
                for where, latency in self._latency.items()
            },
            polls=dict(self._polls),
            streams_opened=self._streams_opened,
        )
