"""The fake's PostgREST: `GET /rest/v1/<table>?<filters>&order=<col>.asc&limit=N` over the same rows
its Realtime changes come from, on the same port (as Supabase serves both from one host).

A connection's first request head decides what it is: an upgrade goes on to the WebSocket server
with the head replayed, anything else is answered here and closed. Modelled: the `apikey` header
and `Authorization: Bearer` (both required, as Supabase's gateway does), `select=*`, filters with the
Realtime filter operators (`eq`, `neq`, `lt`, `lte`, `gt`, `gte`, `in`; several are ANDed), one
`order` column ascending or descending, `limit`, `select` of `*` or a list of columns, `HEAD`, the
`db-max-rows` cap and its `Content-Range` header, and `Prefer: count=exact`. Not modelled: `or=`,
`Range` request headers, offsets, embedding, RLS.

The cap and the header are PostgREST's `RangeQuery.rangeStatusHeader` and `contentRangeH`
(postgrest/src/PostgREST/RangeQuery.hs): a read is cut to `db-max-rows` rows without an error;
`Content-Range` is `<first>-<last>/<total>` (`*/<total>` when no row came back), the total `*`
unless the request asked `Prefer: count=exact`; the status is 200 unless a total is known and the
rows sent are fewer than it, then 206 Partial Content. The total counts every row the filters
select, whatever the limit or the cap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from relay.testing.fake_tables import Filter, Row, SubscriptionError, Table

REST_PREFIX = "/rest/v1/"
MAX_HEAD_BYTES = 16 * 1024


class ReplayStream(trio.abc.Stream):
    """A stream whose first bytes are ones already read from it: the head the sniffing consumed."""

    def __init__(self, stream: trio.abc.Stream, already_read: bytes) -> None:
        self._stream = stream
        self._pending = already_read

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            chunk, self._pending = self._pending[:size], self._pending[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """Everything received up to and including the end of the first request head; None if the peer
    left or sent more than MAX_HEAD_BYTES without ending one."""
    received = b""
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_HEAD_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        received += chunk
    return received


@dataclass(frozen=True)
class RestRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-case names

    @property
    def is_upgrade(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"


def parse_head(head: bytes) -> RestRequest:
    request_line, *lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, _, rest = request_line.partition(" ")
    target = rest.rpartition(" ")[0] or rest
    parts = urlsplit(target)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RestRequest(method, unquote(parts.path), parse_qsl(parts.query, keep_blank_values=True), headers)


@dataclass(frozen=True)
class RestAnswer:
    status: int
    body: Any  # JSON; None for HEAD
    headers: tuple[tuple[str, str], ...] = ()


def answer(
    request: RestRequest, tables: Mapping[str, Table], valid_keys: Iterable[str], max_rows: int | None = None
) -> RestAnswer:
    """The answer PostgREST behind Supabase's gateway would give; `max_rows` is its `db-max-rows`."""
    status, body, headers = _answer(request, tables, valid_keys, max_rows)
    return RestAnswer(status, None if request.method == "HEAD" else body, headers)


def _answer(
    request: RestRequest, tables: Mapping[str, Table], valid_keys: Iterable[str], max_rows: int | None
) -> tuple[int, Any, tuple[tuple[str, str], ...]]:
    keys = set(valid_keys)
    if not request.path.startswith(REST_PREFIX):
        return 404, {"message": "no Route matched with those values"}, ()
    if request.headers.get("apikey") not in keys:
        return (
            401,
            {
                "message": "Invalid API key",
                "hint": "Double check your Supabase `anon` or `service_role` API key.",
            },
            (),
        )
    if request.headers.get("authorization") != f"Bearer {request.headers['apikey']}":
        return 401, {"code": "PGRST301", "message": "JWT is missing or does not match the apikey"}, ()
    if request.method not in ("GET", "HEAD"):
        return 405, {"message": "this fake PostgREST reads only"}, ()
    name = request.path.removeprefix(REST_PREFIX)
    table = tables.get(name)
    if table is None:
        return 404, {"code": "42P01", "message": f'relation "public.{name}" does not exist'}, ()
    try:
        rows, total = select(table, request.query, max_rows)
    except (SubscriptionError, ValueError) as exc:
        return 400, {"code": "PGRST100", "message": str(exc)}, ()
    counted = "count=exact" in request.headers.get("prefer", "")
    status, content_range = range_status(len(rows), total if counted else None)
    headers = [("Content-Range", content_range)]
    if counted:
        headers.append(("Preference-Applied", "count=exact"))
    return status, rows, tuple(headers)


def range_status(sent: int, total: int | None) -> tuple[int, str]:
    """PostgREST's status and Content-Range for `sent` rows from offset 0 of `total` (None: not counted)."""
    last = sent - 1
    shown_total = "*" if total is None else str(total)
    rows_part = f"0-{last}" if total != 0 and last >= 0 else "*"
    status = 206 if total is not None and sent < total else 200
    return status, f"{rows_part}/{shown_total}"


def select(
    table: Table, query: Iterable[tuple[str, str]], max_rows: int | None = None
) -> tuple[list[Row], int]:
    """The rows a read returns (at most `limit`, at most `max_rows`), and how many its filters select."""
    filters: list[Filter] = []
    order: str | None = None
    descending = False
    limit: int | None = None
    columns: list[str] | None = None
    for name, value in query:
        if name == "select":
            if value != "*":
                columns = [column.strip() for column in value.split(",")]
                unknown = [column for column in columns if column not in table.columns]
                if unknown:
                    raise ValueError(f"column {unknown[0]!r} of {table.name} does not exist")
        elif name == "order":
            column, _, direction = value.partition(".")
            if direction not in ("", "asc", "desc"):
                raise ValueError(f"this fake orders by asc or desc only, not {value!r}")
            order = column
            descending = direction == "desc"
        elif name == "limit":
            limit = int(value)
        else:
            parsed = Filter.parse(f"{name}={_unquoted(value)}")
            if parsed is None or parsed.column not in table.columns:
                raise ValueError(f"column {name!r} of {table.name} does not exist")
            filters.append(parsed)
    rows = [row for row in table.rows.values() if all(f.matches(row) for f in filters)]
    if order is not None:
        column = order
        rows.sort(key=lambda row: (row.get(column) is None, row.get(column)), reverse=descending)
    caps = [cap for cap in (limit, max_rows) if cap is not None]
    sent = rows[: min(caps)] if caps else rows
    if columns is not None:
        return [{column: row.get(column) for column in columns} for row in sent], len(rows)
    return [dict(row) for row in sent], len(rows)


def _unquoted(value: str) -> str:
    # PostgREST lets a value be double-quoted when it holds reserved characters: op."a,b".
    operator, dot, operand = value.partition(".")
    if dot and len(operand) >= 2 and operand[0] == operand[-1] == '"':
        operand = operand[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return f"{operator}{dot}{operand}"


REASONS = {
    200: "OK",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
}


def http_response(status: int, body: Any, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """The whole response; a None body (HEAD) sends the head alone."""
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"{extra}"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + payload


def request_faction(request: RestRequest, column: str = "faction_id") -> int | None:
    """The faction a read is for (its `<column>=eq.N` filter), None for a read across factions."""
    for name, value in request.query:
        if name == column and value.startswith("eq."):
            try:
                return int(value[3:])
            except ValueError:
                return None
    return None
