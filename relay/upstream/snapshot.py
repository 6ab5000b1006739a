"""Reading a faction's current rows through Supabase's REST interface (PostgREST).

A snapshot is what a reconcile compares the stored rows with: `GET <rest base>/<table>?select=*&<the
channel's filter>&order=<key>.asc&limit=<page>`, paged by key (`<key>=gt.<last key>`) rather than by
offset, so that a row inserted or deleted while the pages are read cannot shift a row out of every
page. Each page is one upstream request; a faction with fewer rows than a page costs one per table.

PostgREST cuts every read to its `db-max-rows` (Supabase's default is 1,000; an operator may set it
lower) without an error: a cut page is an ordinary 200 whose `Content-Range` says only which rows
came (`0-499/*`). So a short page is never taken as the last one by itself. Each request asks
`Prefer: count=exact`, and PostgREST's `Content-Range` then carries how many rows the filters select
(`0-499/1300`, status 206 when that is more than were sent; postgrest `RangeQuery.rangeStatusHeader`):
a page holding all of them is the last. Without a total (a proxy dropped the header, an older
PostgREST), the read goes on until a page comes back empty, one request more.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from relay.upstream.phoenix import split_conditions

log = logging.getLogger(__name__)

# Supabase caps a PostgREST answer at 1,000 rows by default (db-max-rows); asking for no more keeps a
# short page from being mistaken for the last one.
PAGE_ROWS = 1_000
# A value PostgREST would read as syntax unless double-quoted.
RESERVED = set(',.:()"\\ ')


class SnapshotError(Exception):
    """The REST read failed; says how (status and PostgREST's message, or the network error), never the key."""

    def __init__(self, message: str, requests: int) -> None:
        super().__init__(message)
        self.requests = requests  # upstream requests made before it failed, the failed one included


@dataclass(frozen=True, slots=True)
class RestSettings:
    base_url: str  # …/rest/v1
    api_key: str
    timeout_s: float


def postgrest_filters(realtime_filter: str) -> list[tuple[str, str]]:
    """A Realtime filter (`col=op.value`, several ANDed with top-level commas) as PostgREST query
    parameters, which AND when repeated: `a=eq.1,b=in.(2,3)` → [("a", "eq.1"), ("b", "in.(2,3)")]."""
    conditions = split_conditions(realtime_filter)
    parameters = []
    for condition in conditions:
        column, _, operation = condition.partition("=")
        parameters.append((column.strip(), operation))
    return parameters


def key_operand(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and (not text or RESERVED & set(text)):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


@dataclass(frozen=True, slots=True)
class Snapshot:
    rows: list[dict[str, Any]]
    requests: int  # upstream requests it took: one per page
    bytes: int = 0  # response bodies received


def content_range_total(header: str | None) -> int | None:
    """The total of a PostgREST `Content-Range` (`0-9/25`, `*/0`), None when absent or `*`."""
    if not header:
        return None
    _, slash, total = header.strip().rpartition("/")
    if not slash or not total.isdigit():
        return None
    return int(total)


async def read_rows(
    client: httpx.AsyncClient, settings: RestSettings, table: str, realtime_filter: str, key: str
) -> Snapshot:
    """Every row of `table` that the channel's filter selects, in key order."""
    rows: list[dict[str, Any]] = []
    requests = 0
    received = 0
    seen: set[Any] = set()
    headers = {
        "apikey": settings.api_key,
        "Authorization": f"Bearer {settings.api_key}",
        "Accept": "application/json",
        "Prefer": "count=exact",
    }
    base = [
        ("select", "*"),
        *postgrest_filters(realtime_filter),
        ("order", f"{key}.asc"),
        ("limit", str(PAGE_ROWS)),
    ]
    while True:
        after = [(key, f"gt.{key_operand(rows[-1][key])}")] if rows else []
        requests += 1
        try:
            # Streamed into our own bytes: httpx's response keeps what `aread` read, and it sits in a
            # reference cycle with its stream, so a page of large rows would outlive the reconcile.
            async with client.stream(
                "GET",
                f"{settings.base_url}/{table}",
                params=tuple(base + after),
                headers=headers,
                timeout=settings.timeout_s,
            ) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
                total = content_range_total(response.headers.get("content-range"))
        except httpx.HTTPError as exc:
            raise SnapshotError(f"reading {table}: {type(exc).__name__}: {exc}", requests) from None
        received += len(body)
        try:
            page = _page(response.status_code, body, key)
            _check_progress(page, key, seen)
        except ValueError as exc:
            raise SnapshotError(f"reading {table}: {exc}", requests) from None
        rows.extend(page)
        # The total counts the rows after the last key read, so a page holding that many is the last.
        if not page or (total is not None and len(page) >= total):
            return Snapshot(rows, requests, received)


def _check_progress(page: list[dict[str, Any]], key: str, seen: set[Any]) -> None:
    """A page must hold only keys not read before: a server ignoring the key filter would otherwise
    be read forever."""
    for row in page:
        value = row[key]
        try:
            if value in seen:
                raise ValueError(f"the server sent {key} {value!r} twice; its paging is broken")
            seen.add(value)
        except TypeError:
            raise ValueError(f"the {key!r} column holds an unhashable value") from None


def _page(status: int, body: bytes, key: str) -> list[dict[str, Any]]:
    """The rows of one answer; ValueError saying what is wrong with it."""
    if status not in (200, 206):  # 206: PostgREST's "more rows than these" (see the module doc)
        try:
            detail = json.loads(body).get("message")
        except (ValueError, AttributeError):
            detail = None
        raise ValueError(f"HTTP {status}" + (f": {detail}" if detail else ""))
    try:
        page = json.loads(body)
    except ValueError:
        raise ValueError("the answer is not JSON") from None
    if not isinstance(page, list) or not all(isinstance(row, dict) and key in row for row in page):
        raise ValueError(f"the answer is not a list of rows with a {key!r} column")
    return page


@dataclass(frozen=True, slots=True)
class Probe:
    """How many rows a read selects and the greatest key among them: what a deafness probe compares."""

    count: int
    newest: Any  # None when there is no row
    bytes: int  # response body received


async def probe_rows(
    client: httpx.AsyncClient, settings: RestSettings, table: str, filters: list[tuple[str, str]], key: str
) -> Probe:
    """One request, whatever the table's size: `select=<key>&order=<key>.desc&limit=1` with
    `Prefer: count=exact`, so the body is one key and the count rides in `Content-Range`."""
    headers = {
        "apikey": settings.api_key,
        "Authorization": f"Bearer {settings.api_key}",
        "Accept": "application/json",
        "Prefer": "count=exact",
    }
    params = (("select", key), *filters, ("order", f"{key}.desc"), ("limit", "1"))
    try:
        response = await client.get(
            f"{settings.base_url}/{table}", params=params, headers=headers, timeout=settings.timeout_s
        )
    except httpx.HTTPError as exc:
        raise SnapshotError(f"probing {table}: {type(exc).__name__}: {exc}", 1) from None
    total = content_range_total(response.headers.get("content-range"))
    try:
        page = _page(response.status_code, response.content, key)
    except ValueError as exc:
        raise SnapshotError(f"probing {table}: {exc}", 1) from None
    if total is None:
        raise SnapshotError(f"probing {table}: the answer carries no row count (Content-Range)", 1)
    return Probe(total, page[0][key] if page else None, len(response.content))
