"""Reading a faction's current rows through Supabase's REST interface (PostgREST).

A snapshot is what a reconcile compares the stored rows with: `GET <rest base>/<table>?select=*&<the
channel's filter>&order=<key>.asc&limit=<page>`, paged by key (`<key>=gt.<last key>`) rather than by
offset, so that a row inserted or deleted while the pages are read cannot shift a row out of every
page. Each page is one upstream request; a faction with fewer rows than a page costs one per table.
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


async def read_rows(
    client: httpx.AsyncClient, settings: RestSettings, table: str, realtime_filter: str, key: str
) -> Snapshot:
    """Every row of `table` that the channel's filter selects, in key order."""
    rows: list[dict[str, Any]] = []
    requests = 0
    headers = {
        "apikey": settings.api_key,
        "Authorization": f"Bearer {settings.api_key}",
        "Accept": "application/json",
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
        except httpx.HTTPError as exc:
            raise SnapshotError(f"reading {table}: {type(exc).__name__}: {exc}", requests) from None
        try:
            page = _page(response.status_code, body, key)
        except ValueError as exc:
            raise SnapshotError(f"reading {table}: {exc}", requests) from None
        rows.extend(page)
        if len(page) < PAGE_ROWS:
            return Snapshot(rows, requests)


def _page(status: int, body: bytes, key: str) -> list[dict[str, Any]]:
    """The rows of one answer; ValueError saying what is wrong with it."""
    if status != 200:
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
