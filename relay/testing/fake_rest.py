"""The fake's PostgREST: `GET /rest/v1/<table>?<filters>&order=<col>.asc&limit=N` over the same rows
its Realtime changes come from, on the same port (as Supabase serves both from one host).

A connection's first request head decides what it is: an upgrade goes on to the WebSocket server
with the head replayed, anything else is answered here and closed. Modelled: the `apikey` header
and `Authorization: Bearer` (both required, as Supabase's gateway does), `select=*`, filters with the
Realtime filter operators (`eq`, `neq`, `lt`, `lte`, `gt`, `gte`, `in`; several are ANDed), one
`order` column ascending, `limit`. Not modelled: other selects, `or=`, ranges, embedding, RLS.
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


def answer(request: RestRequest, tables: Mapping[str, Table], valid_keys: Iterable[str]) -> tuple[int, Any]:
    """(status, JSON body) as PostgREST behind Supabase's gateway would give them."""
    keys = set(valid_keys)
    if not request.path.startswith(REST_PREFIX):
        return 404, {"message": "no Route matched with those values"}
    if request.headers.get("apikey") not in keys:
        return 401, {
            "message": "Invalid API key",
            "hint": "Double check your Supabase `anon` or `service_role` API key.",
        }
    if request.headers.get("authorization") != f"Bearer {request.headers['apikey']}":
        return 401, {"code": "PGRST301", "message": "JWT is missing or does not match the apikey"}
    if request.method != "GET":
        return 405, {"message": "this fake PostgREST reads only"}
    name = request.path.removeprefix(REST_PREFIX)
    table = tables.get(name)
    if table is None:
        return 404, {"code": "42P01", "message": f'relation "public.{name}" does not exist'}
    try:
        return 200, select(table, request.query)
    except (SubscriptionError, ValueError) as exc:
        return 400, {"code": "PGRST100", "message": str(exc)}


def select(table: Table, query: Iterable[tuple[str, str]]) -> list[Row]:
    filters: list[Filter] = []
    order: str | None = None
    limit: int | None = None
    for name, value in query:
        if name == "select":
            if value != "*":
                raise ValueError(f"this fake selects * only, not {value!r}")
        elif name == "order":
            column, _, direction = value.partition(".")
            if direction not in ("", "asc"):
                raise ValueError(f"this fake orders ascending only, not {value!r}")
            order = column
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
        rows.sort(key=lambda row: (row.get(column) is None, row.get(column)))
    return [dict(row) for row in rows[:limit]]


def _unquoted(value: str) -> str:
    # PostgREST lets a value be double-quoted when it holds reserved characters: op."a,b".
    operator, dot, operand = value.partition(".")
    if dot and len(operand) >= 2 and operand[0] == operand[-1] == '"':
        operand = operand[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return f"{operator}{dot}{operand}"


def http_response(status: int, body: Any) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
    head = (
        f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + payload
