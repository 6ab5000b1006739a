"""A minimal Server-Sent Events client over a raw Trio socket (or TLS over it), for the tests.

HTTP/1.0, so the body arrives unchunked and ends when the server closes; no async generators, so
nothing is left for the garbage collector when a test stops reading half-way.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio


class SseStream:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.retry: str | None = None

    async def _fill(self) -> bool:
        chunk = await self._stream.receive_some(65536)
        self._buffer += chunk
        return bool(chunk)

    async def read_head(self) -> None:
        while b"\r\n\r\n" not in self._buffer:
            if not await self._fill():
                raise EOFError("connection closed before the response head")
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def read_body(self) -> bytes:
        while await self._fill():
            pass
        return self._buffer

    async def read_sized_body(self) -> bytes:
        """The body of an answer with a Content-Length (after `read_head`), leaving what follows."""
        length = int(self.headers["content-length"])
        while len(self._buffer) < length:
            if not await self._fill():
                raise EOFError("connection closed before the answer's end")
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return body

    async def next_record(self) -> dict[str, str]:
        """The next event (its `id`, `event`, `data` fields) or comment (`comment`); EOFError at the end."""
        while True:
            while b"\n\n" not in self._buffer:
                if not await self._fill():
                    raise EOFError("stream ended")
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            record: dict[str, str] = {}
            for line in block.decode().split("\n"):
                field, _, value = line.partition(": ")
                if field == "retry":
                    self.retry = value
                else:
                    record[field or "comment"] = value
            if record:
                return record


@asynccontextmanager
async def open_sse(
    url: str, path: str, headers: Mapping[str, str] | None = None, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[SseStream]:
    """`tls` for an https:// URL: the context that trusts its server."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, parts.port or (443 if tls else 80))
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname=host)
    async with stream:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        request = f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        await stream.send_all(request.encode())
        sse = SseStream(stream)
        await sse.read_head()
        yield sse
