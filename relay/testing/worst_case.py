"""The worst legitimate load at the default config (issue 16, point 1), driven against a running
`relay serve` and the fake upstream it is pointed at, with the relay's RSS sampled throughout.

Shared by tests/test_memory_budget.py and bench/budget.py (tests import nothing from `bench`). Every
size comes from the config's defaults: `limits.max_factions` factions, each publishing
`publish.max_body_bytes` bodies until past `retention.bytes_per_faction`, upstream rows at the size
Supabase allows, then members polling from before the flood and readers of `/state`, all at once.
Each faction, and each member, speaks from a loopback address of its own (127.2.x.y, 127.3.x.y), as
members do from their own homes: `limits.client_rate` stays at its default and is never reached.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from relay.config import LimitsConfig, PublishConfig, RetentionConfig
from relay.testing.fake_supabase import FakeSupabase
from relay.testing.rss import Phase, RssSampler, rss_bytes

MIB = 1024 * 1024
# The stated budget: with every default, the relay's RSS stays under this however hard it is driven.
# Measured at 492-501 MiB peak and 173-179 MiB settled (bench/RESULTS-budget.md): the peak is every one of 150
# sockets assembling a 1 MiB row at the same moment (about 2 MiB each in trio-websocket); without
# that, the load peaks under 200 MiB.
RSS_BUDGET_BYTES = 640 * MIB
# Supabase Realtime caps a change's payload at 1 MiB (relay/upstream/connection.py's MAX_FRAME_BYTES
# leaves room above it); the row leaves 8 KiB of it to the change's envelope (columns, commit time,
# table): about the largest row the relay can be sent.
UPSTREAM_ROW_BYTES = MIB - 8 * 1024
PUBLISHED_TYPE = "faction_members_update"
UPSTREAM_TABLE = "faction_messages"
FIRST_FACTION = 50_001
REQUESTS_IN_FLIGHT = 16  # factions publishing at once: enough to keep the relay's core busy
STATUS_EVERY_S = 1.0  # /status costs 10 requests of the control address's 20/s
HTTP_TIMEOUT_S = 60.0
SETTLE_BYTES = MIB
SETTLE_MAX_S = 20.0
MAX_RETRIES = 5


@dataclass(frozen=True)
class Plan:
    factions: int
    publishes_per_faction: int
    body_bytes: int
    rows_per_faction: int
    row_bytes: int
    members_per_faction: int = 1
    state_readers: int = 10


def default_plan() -> Plan:
    """The worst case the defaults allow: every faction, retention overfilled by publishes alone and
    again by upstream rows alone."""
    retention, limits, publish = RetentionConfig(), LimitsConfig(), PublishConfig()
    if PUBLISHED_TYPE not in publish.types:
        raise ValueError(f"{PUBLISHED_TYPE} is not among the default publish.types {publish.types}")
    return Plan(
        factions=limits.max_factions,
        publishes_per_faction=retention.bytes_per_faction // publish.max_body_bytes + 1,
        body_bytes=publish.max_body_bytes,
        rows_per_faction=math.ceil(retention.bytes_per_faction / UPSTREAM_ROW_BYTES),
        row_bytes=UPSTREAM_ROW_BYTES,
    )


@dataclass
class Outcome:
    phases: list[Phase]
    peak_rss: int
    published_bytes: int = 0
    rows_inserted: int = 0
    polls: int = 0
    served_bytes: int = 0
    dropped: int = 0  # reads the relay closed the connection on without answering, asked again
    newest_missing: list[int] = field(default_factory=list)  # factions whose newest publish is not served


def faction_address(index: int) -> str:
    return f"127.2.{index // 250}.{index % 250 + 1}"


def member_address(index: int) -> str:
    return f"127.3.{index // 250}.{index % 250 + 1}"


def members_body(faction_id: int, sequence: int, size: int, api_key: str) -> bytes:
    """A `POST /events` body of exactly `size` bytes: a members list as today's script sends one
    (many small objects, not one long string), padded to the byte."""
    head = json.dumps({"faction_id": faction_id, "api_key": api_key, "type": PUBLISHED_TYPE})[:-1]
    members = members_json(size)
    body = f'{head}, "data": {{"sequence": {sequence}, "members": {members}, "padding": ""}}}}'
    padding = size - len(body)
    if padding < 0:
        raise ValueError(f"a body of {size} bytes has no room for its members")
    return body.replace('"padding": ""', f'"padding": "{"p" * padding}"').encode()


@functools.cache
def members_json(size: int) -> str:
    """The members of a body of `size` bytes, built once: encoding them takes ~80 ms, per body too long."""
    members = [
        {
            "id": 1_000_000 + n,
            "name": f"member{n}",
            "level": 1 + n % 100,
            "status": {"state": "Okay", "until": 0},
            "last_action": {"status": "Online", "timestamp": 1_764_000_000},
        }
        for n in range((size - 1024) // 145)  # about 138 bytes each, so the padding is small
    ]
    return json.dumps(members, separators=(",", ":"))


def client(url: str, address: str) -> httpx.AsyncClient:
    # Plain HTTP: without verify=False each client would load the CA bundle (~80 ms of this process's CPU).
    transport = httpx.AsyncHTTPTransport(local_address=address, verify=False)
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=HTTP_TIMEOUT_S)


class Driver:
    def __init__(self, url: str, fake: FakeSupabase, api_key: str, plan: Plan, sampler: RssSampler) -> None:
        self.url, self.fake, self.api_key, self.plan, self.sampler = url, fake, api_key, plan, sampler
        self.factions = [FIRST_FACTION + index for index in range(plan.factions)]
        self.outcome = Outcome(sampler.phases, 0)
        self.before_flood = 0  # a cursor from before every publish: the members' `since`
        self.newest: dict[int, tuple[int, int]] = {}  # faction -> its last publish's (id, timestamp)

    async def run(self) -> Outcome:
        """Each phase in turn, unless the sampler has seen the RSS over its limit (the load then stops
        between requests, never inside one, and the checks after it are not made)."""
        async with client(self.url, "127.0.0.1") as control:
            phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("started", functools.partial(ping, control)),
                ("subscribed", functools.partial(self.subscribe, control)),
                ("published", functools.partial(self.publish, self.plan.publishes_per_faction)),
                ("upstream rows", functools.partial(self.insert_rows, control)),
                ("cold reads", self.cold_reads),
                ("settled", self.settle),
            ]
            for name, phase in phases:
                if self.stopping:
                    return self.outcome
                self.sampler.begin(name)
                await phase()
            self.sampler.close()
            await ping(control)
            # One more publish each, then the check that it is served: the rows alone overfill
            # `retention.bytes_per_faction`, so the flood's publishes may rightly be gone by now.
            await self.publish(1, first=self.plan.publishes_per_faction)
            await self.check_newest()
        return self.outcome

    @property
    def stopping(self) -> bool:
        return self.sampler.stopped_above is not None

    async def settle(self) -> None:
        """Nothing asked until the RSS moves by less than SETTLE_BYTES in a second (what the reads held
        is let go only as their connections close), for at most SETTLE_MAX_S."""
        with trio.move_on_after(SETTLE_MAX_S):
            previous = rss_bytes(self.sampler.pid)
            while True:
                await trio.sleep(1.0)
                current = rss_bytes(self.sampler.pid)
                if abs(current - previous) < SETTLE_BYTES:
                    return
                previous = current

    async def each_faction(self, work: Callable[[int, int, httpx.AsyncClient], Awaitable[None]]) -> None:
        """`work(index, faction_id, its client)` for every faction, REQUESTS_IN_FLIGHT at a time."""
        limiter = trio.CapacityLimiter(REQUESTS_IN_FLIGHT)

        async def one(index: int, faction_id: int) -> None:
            async with limiter, client(self.url, faction_address(index)) as http:
                if self.stopping:
                    return
                await work(index, faction_id, http)

        async with trio.open_nursery() as nursery:
            for index, faction_id in enumerate(self.factions):
                nursery.start_soon(one, index, faction_id)

    async def subscribe(self, control: httpx.AsyncClient) -> None:
        cursors: list[int] = []

        async def one(index: int, faction_id: int, http: httpx.AsyncClient) -> None:
            body = {"faction_id": faction_id, "api_key": self.api_key}
            cursors.append((await checked(http.post("/subscribe", json=body)))["timestamp"])

        await self.each_faction(one)
        self.before_flood = max(cursors)
        await self.wait_status(control, lambda f: live(f) and f["reconcile"]["reconciles"] >= 1)

    async def publish(self, publishes: int, first: int = 0) -> None:
        """`publishes` bodies for each faction, numbered from `first`; each faction's last one kept."""
        plan = self.plan

        async def one(index: int, faction_id: int, http: httpx.AsyncClient) -> None:
            for sequence in range(first, first + publishes):
                if self.stopping:
                    return
                body = members_body(faction_id, sequence, plan.body_bytes, self.api_key)
                headers = {"Content-Type": "application/json"}
                answer = await checked(http.post("/events", content=body, headers=headers))
                self.newest[faction_id] = (answer["id"], answer["timestamp"])
                self.outcome.published_bytes += len(body)

        await self.each_faction(one)

    async def insert_rows(self, control: httpx.AsyncClient) -> None:
        """Rows through the upstream as live changes, then every socket dropped, so that each faction
        reconnects and reconciles: its rows read back through the fake's REST."""
        before = await read_status(control)
        stored_before = {f["faction_id"]: sum(f["events_per_minute"]) for f in before}
        reconciles = {f["faction_id"]: f["reconcile"]["reconciles"] for f in before}
        # One string shared by every row (the fake copies rows, not strings): the fake stays small.
        text = "m" * (self.plan.row_bytes - 200)
        for index, faction_id in enumerate(self.factions):
            for n in range(self.plan.rows_per_faction):
                row = {"id": 1_000 * index + n + 1, "faction_id": faction_id, "message": text}
                self.fake.insert(UPSTREAM_TABLE, row)
                self.outcome.rows_inserted += 1
            await trio.lowlevel.checkpoint()  # let the fake send them while more are queued
        rows = self.plan.rows_per_faction
        await self.wait_status(
            control, lambda f: sum(f["events_per_minute"]) >= stored_before[f["faction_id"]] + rows
        )
        self.fake.drop_connections()
        await self.wait_status(
            control, lambda f: live(f) and f["reconcile"]["reconciles"] > reconciles[f["faction_id"]]
        )

    async def cold_reads(self) -> None:
        """Members polling from before the flood and readers of `/state`, all at once."""
        async with trio.open_nursery() as nursery:
            for index in range(self.plan.factions * self.plan.members_per_faction):
                nursery.start_soon(self.poll_from_before, index, self.factions[index % self.plan.factions])
            for index in range(self.plan.state_readers):
                nursery.start_soon(self.read_state, index)

    async def get(self, http: httpx.AsyncClient, path: str, params: dict[str, int]) -> httpx.Response:
        """A member's GET, asked again (as the userscript does) when the relay closed the connection
        without an answer; each time counted."""
        for _ in range(MAX_RETRIES):
            try:
                return await http.get(path, params=params)
            except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError):
                self.outcome.dropped += 1
        return await http.get(path, params=params)

    async def poll_from_before(self, index: int, faction_id: int) -> None:
        """A member back after the flood: one poll from `before_flood`, answered from the database."""
        async with client(self.url, member_address(index)) as http:
            response = await self.get(http, "/events", {"faction_id": faction_id, "since": self.before_flood})
            # Not parsed: answers of megabytes would make this process the bottleneck.
            checked_status(response)
            self.outcome.polls += 1
            self.outcome.served_bytes += len(response.content)

    async def read_state(self, index: int) -> None:
        address = member_address(self.plan.factions * self.plan.members_per_faction + index)
        async with client(self.url, address) as http:
            faction_id = self.factions[index * self.plan.factions // max(1, self.plan.state_readers)]
            response = await self.get(http, "/state", {"faction_id": faction_id})
            checked_status(response)
            self.outcome.served_bytes += len(response.content)

    async def check_newest(self) -> None:
        async def one(index: int, faction_id: int, http: httpx.AsyncClient) -> None:
            event_id, timestamp = self.newest[faction_id]
            params = {"faction_id": faction_id, "since": timestamp - 1}
            answer = await checked(http.get("/events", params=params))
            if event_id not in {event["id"] for event in answer["events"]}:
                self.outcome.newest_missing.append(faction_id)

        await self.each_faction(one)

    async def wait_status(self, control: httpx.AsyncClient, ready: Callable[[dict[str, Any]], bool]) -> None:
        """/status every STATUS_EVERY_S until every faction of the plan is `ready` (callers bound it)."""
        wanted = set(self.factions)
        while not self.stopping:
            if wanted <= {f["faction_id"] for f in await read_status(control) if ready(f)}:
                return
            await trio.sleep(STATUS_EVERY_S)


async def ping(control: httpx.AsyncClient) -> None:
    await checked(control.get("/ping"))


def live(faction: dict[str, Any]) -> bool:
    return bool(faction["upstream"]["state"] == "connected")


async def read_status(control: httpx.AsyncClient) -> list[dict[str, Any]]:
    while True:
        response = await control.get("/status")
        if response.status_code != 429:
            factions: list[dict[str, Any]] = checked_answer(response)["factions"]
            return factions
        await trio.sleep(float(response.headers["Retry-After"]))


async def checked(request: Awaitable[httpx.Response]) -> Any:
    return checked_answer(await request)


def checked_answer(response: httpx.Response) -> Any:
    return checked_status(response).json()


def checked_status(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:200]}"
        )
    return response


async def drive_worst_case(
    url: str,
    fake: FakeSupabase,
    api_key: str,
    plan: Plan,
    sampler: RssSampler,
    *,
    stop_above_bytes: int | None = None,
) -> Outcome:
    """The whole load against the relay at `url` (process `sampler.pid`), sampling its RSS until the
    end, or only until the RSS passes `stop_above_bytes` (a test that has failed stops there, sparing
    a shared machine gigabytes). The caller keeps `sampler`, whose phases say how far the load got."""
    driver = Driver(url, fake, api_key, plan, sampler)
    async with trio.open_nursery() as nursery:
        await nursery.start(sampler.run, stop_above_bytes)
        await driver.run()
        nursery.cancel_scope.cancel()
    sampler.close()
    driver.outcome.peak_rss = sampler.peak
    return driver.outcome
