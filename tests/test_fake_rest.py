"""The fake's PostgREST, on the same port as its Realtime socket, over the same rows."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from relay.testing.fake_supabase import FakeSupabase
from relay.upstream import snapshot

pytestmark = pytest.mark.e2e

KEY = "anon-key"
HEADERS = {"apikey": KEY, "Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeSupabase:
    server = FakeSupabase(valid_keys=(KEY,))
    await nursery.start(server.run)
    for n, faction in [(3, 1), (1, 1), (2, 2), (4, 1)]:
        server.insert("war_calls", {"id": n, "faction_id": faction, "target_name": f"t,{n}"}, deliver=False)
    return server


async def read(fake: FakeSupabase, path: str, headers: dict[str, str] = HEADERS) -> tuple[int, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fake.port}") as http:
        response = await http.get(path, headers=headers)
    return response.status_code, response.json()


async def test_filtered_ordered_limited_reads_of_the_same_rows(fake: FakeSupabase) -> None:
    status, rows = await read(fake, "/rest/v1/war_calls?select=*&faction_id=eq.1&order=id.asc&limit=2")
    assert status == 200
    assert [row["id"] for row in rows] == [1, 3]
    status, rows = await read(fake, "/rest/v1/war_calls?faction_id=eq.1&id=gt.3&order=id.asc")
    assert [row["id"] for row in rows] == [4]
    status, rows = await read(fake, '/rest/v1/war_calls?target_name=eq."t,2"')
    assert [row["id"] for row in rows] == [2]
    fake.delete("war_calls", 4, deliver=False)
    assert [row["id"] for row in (await read(fake, "/rest/v1/war_calls?faction_id=eq.1"))[1]] == [3, 1]
    assert fake.rest_request_count == 4
    assert fake.rest_requests[-1].query == [("faction_id", "eq.1")]


async def test_refusals_and_scripted_failures(fake: FakeSupabase) -> None:
    assert (await read(fake, "/rest/v1/war_calls", headers={}))[0] == 401
    assert (await read(fake, "/rest/v1/war_calls", headers={"apikey": KEY}))[0] == 401
    assert (await read(fake, "/rest/v1/nothing_here"))[0] == 404
    status, body = await read(fake, "/rest/v1/war_calls?colour=eq.red")
    assert (status, body["code"]) == (400, "PGRST100")
    fake.fail_rest(503, count=1)
    assert (await read(fake, "/rest/v1/war_calls"))[0] == 503
    assert (await read(fake, "/rest/v1/war_calls"))[0] == 200


async def test_a_held_answer_carries_the_rows_as_they_were_when_read(fake: FakeSupabase) -> None:
    fake.rest_hold = trio.Event()
    answers: list[Any] = []

    async def read_into() -> None:
        answers.append((await read(fake, "/rest/v1/war_calls?faction_id=eq.2"))[1])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_into)
            await fake.wait_until(lambda: fake.rest_request_count == 1)
            fake.insert("war_calls", {"id": 9, "faction_id": 2}, deliver=False)
            fake.rest_hold.set()
    assert [row["id"] for row in answers[0]] == [2]


async def test_the_relay_reads_a_snapshot_page_by_page_by_key(
    fake: FakeSupabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "PAGE_ROWS", 2)
    for n in (5, 6, 7):
        fake.insert("war_calls", {"id": n, "faction_id": 1}, deliver=False)
    settings = snapshot.RestSettings(f"http://127.0.0.1:{fake.port}/rest/v1", KEY, timeout_s=5)
    async with httpx.AsyncClient() as http:
        read = await snapshot.read_rows(http, settings, "war_calls", "faction_id=eq.1", "id")
    assert [row["id"] for row in read.rows] == [1, 3, 4, 5, 6, 7]
    assert read.requests == 3  # 2 + 2 + 2 rows; the third page's count says there is no more
    assert [dict(request.query).get("id") for request in fake.rest_requests] == [None, "gt.3", "gt.5"]
    assert all(request.headers["authorization"] == f"Bearer {KEY}" for request in fake.rest_requests)
    wrong_key = snapshot.RestSettings(settings.base_url, "wrong", timeout_s=5)
    async with httpx.AsyncClient() as http:
        with pytest.raises(snapshot.SnapshotError, match="HTTP 401") as refused:
            await snapshot.read_rows(http, wrong_key, "war_calls", "", "id")
    assert "wrong" not in str(refused.value)
    assert refused.value.requests == 1


async def test_max_rows_cuts_a_read_and_content_range_says_so_as_postgrest_does(fake: FakeSupabase) -> None:
    fake.rest_max_rows = 2
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fake.port}") as http:
        plain = await http.get("/rest/v1/war_calls?faction_id=eq.1&order=id.asc&limit=1000", headers=HEADERS)
        counted = await http.get(
            "/rest/v1/war_calls?faction_id=eq.1&order=id.asc", headers={**HEADERS, "Prefer": "count=exact"}
        )
        whole = await http.get(
            "/rest/v1/war_calls?faction_id=eq.2", headers={**HEADERS, "Prefer": "count=exact"}
        )
        empty = await http.get(
            "/rest/v1/war_calls?faction_id=eq.9", headers={**HEADERS, "Prefer": "count=exact"}
        )
        newest = await http.head(
            "/rest/v1/war_calls?select=id&faction_id=eq.1&order=id.desc&limit=1",
            headers={**HEADERS, "Prefer": "count=exact"},
        )
        uncounted_empty = await http.get("/rest/v1/war_calls?faction_id=eq.9", headers=HEADERS)
    # Capped without an error: 200 and an open total, unless a count was asked for.
    assert (plain.status_code, plain.headers["content-range"]) == (200, "0-1/*")
    assert [row["id"] for row in plain.json()] == [1, 3]
    assert (counted.status_code, counted.headers["content-range"]) == (206, "0-1/3")
    assert counted.headers["preference-applied"] == "count=exact"
    assert (whole.status_code, whole.headers["content-range"]) == (200, "0-0/1")
    assert (empty.status_code, empty.headers["content-range"], empty.json()) == (200, "*/0", [])
    assert (newest.status_code, newest.headers["content-range"], newest.content) == (206, "0-0/3", b"")
    assert uncounted_empty.headers["content-range"] == "*/*"


async def test_rest_bytes_and_requests_are_counted_per_faction(fake: FakeSupabase) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fake.port}") as http:
        one = await http.get("/rest/v1/war_calls?faction_id=eq.1", headers=HEADERS)
        await http.get("/rest/v1/war_calls?faction_id=eq.2", headers=HEADERS)
        await http.get("/rest/v1/war_calls?faction_id=eq.2", headers=HEADERS)
        await http.get("/rest/v1/war_calls", headers=HEADERS)
    assert fake.rest_requests_by_faction == {1: 1, 2: 2, None: 1}
    assert fake.rest_bytes[1] > len(one.content)  # the head is paid for too
    assert fake.rest_bytes[2] > fake.rest_bytes[1] > 0


def test_history_gives_each_faction_hundreds_of_old_rows_never_delivered() -> None:
    fake = FakeSupabase(valid_keys=(KEY,))
    fake.seed_history(7, 300)
    fake.seed_history(8, 300)
    calls = fake.rows("war_calls")
    assert len(calls) == len(fake.rows("faction_messages")) == 600
    assert len({row["id"] for row in calls}) == 600
    assert sum(row["faction_id"] == 7 for row in calls) == 300
    assert all(row["created_at"] < "2026-12" for row in calls)


@pytest.mark.parametrize("cap", [7, 25, 26, 1000, None])
async def test_paging_reads_every_row_whatever_max_rows_is(fake: FakeSupabase, cap: int | None) -> None:
    """Below, at and above the faction's 26 rows: a cut page is never taken for the last."""
    fake.rest_max_rows = cap
    for n in range(10, 33):
        fake.insert("war_calls", {"id": n, "faction_id": 1}, deliver=False)
    expected = sorted(row["id"] for row in fake.rows("war_calls") if row["faction_id"] == 1)
    assert len(expected) == 26  # 1, 3, 4 seeded, 10..32 here
    settings = snapshot.RestSettings(f"http://127.0.0.1:{fake.port}/rest/v1", KEY, timeout_s=5)
    async with httpx.AsyncClient() as http:
        read = await snapshot.read_rows(http, settings, "war_calls", "faction_id=eq.1", "id")
    assert [row["id"] for row in read.rows] == expected
    pages = -(-len(expected) // cap) if cap is not None and cap < len(expected) else 1
    assert read.requests == pages
    assert read.bytes > 0


async def test_paging_without_a_total_reads_on_to_an_empty_page(fake: FakeSupabase) -> None:
    """A proxy that drops Content-Range (or an older PostgREST): short pages are still not the end."""
    fake.rest_max_rows = 2
    fake.rest_drop_content_range = True
    settings = snapshot.RestSettings(f"http://127.0.0.1:{fake.port}/rest/v1", KEY, timeout_s=5)
    async with httpx.AsyncClient() as http:
        read = await snapshot.read_rows(http, settings, "war_calls", "faction_id=eq.1", "id")
    assert [row["id"] for row in read.rows] == [1, 3, 4]
    assert read.requests == 3  # 2 rows, 1 row, then the empty page
