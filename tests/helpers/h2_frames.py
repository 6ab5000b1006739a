"""Raw HTTP/2 frames for the hostile tier, built by hand (RFC 9113 section 4.1, RFC 7541 for the header
blocks) so that a client can send what no well-behaved HTTP/2 library would: frames for streams that are
closed, floods, broken dependency chains. Pure functions: bytes in, bytes out."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Sequence

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x2,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PRIORITY_FLAG = 0x20
# SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_INITIAL_WINDOW_SIZE: what a browser typically announces.
CLIENT_SETTINGS = ((0x3, 100), (0x4, 65535))


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id) + payload


def settings_payload(pairs: Iterable[tuple[int, int]] = CLIENT_SETTINGS) -> bytes:
    return b"".join(struct.pack(">HI", key, value) for key, value in pairs)


def settings(pairs: Iterable[tuple[int, int]] = CLIENT_SETTINGS) -> bytes:
    return frame(SETTINGS, 0, 0, settings_payload(pairs))


def http2_settings_header() -> str:
    """The value of an `HTTP2-Settings` header (RFC 7540 section 3.2.1): base64url, no padding."""
    return base64.urlsafe_b64encode(settings_payload()).rstrip(b"=").decode()


def _integer(value: int, prefix_bits: int, first_byte: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 section 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte | value])
    out = [first_byte | limit]
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: bytes) -> bytes:
    return _integer(len(text), 7) + text  # no Huffman coding


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """Each field a literal without indexing and with a literal name: no dynamic table to get wrong."""
    return b"".join(
        b"\x00" + _string(name.encode("latin-1")) + _string(value.encode("latin-1"))
        for name, value in headers
    )


def request_headers(method: str, path: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    return header_block(
        [(":method", method), (":scheme", "http"), (":path", path), (":authority", "relay.test"), *extra]
    )


def headers_frame(
    stream_id: int,
    block: bytes,
    *,
    end_stream: bool = True,
    end_headers: bool = True,
    depends_on: int | None = None,
) -> bytes:
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    if depends_on is not None:
        flags |= PRIORITY_FLAG
        block = struct.pack(">IB", depends_on, 15) + block
    return frame(HEADERS, flags, stream_id, block)


def data_frame(stream_id: int, data: bytes, *, end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, stream_id, data)


def priority_frame(stream_id: int, depends_on: int, weight: int = 15, *, exclusive: bool = False) -> bytes:
    return frame(PRIORITY, 0, stream_id, struct.pack(">IB", depends_on | (exclusive << 31), weight))


def rst_stream(stream_id: int, error_code: int = 0x8) -> bytes:  # CANCEL
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", error_code))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def ping(opaque: bytes = b"hostile!") -> bytes:
    return frame(PING, 0, 0, opaque[:8].ljust(8, b"\0"))


def goaway(last_stream_id: int = 0, error_code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, error_code))


def priority_flood(count: int) -> bytes:
    """`count` idle streams made to exist by PRIORITY frames alone (streams 1, 3, 5, ...)."""
    return b"".join(priority_frame(2 * n + 1, 0) for n in range(count))


def dependency_chain(length: int, path: str = "/ping") -> bytes:
    """Stream 2n+1 depends on stream 2n-1, a tree as deep as it is long, and at its bottom a request
    whose answer the server has to schedule through the whole tree."""
    chain = b"".join(priority_frame(2 * n + 1, max(2 * n - 1, 0)) for n in range(length))
    bottom = 2 * length + 1
    return chain + headers_frame(bottom, request_headers("GET", path), depends_on=bottom - 2)


def continuation_flood(stream_id: int, count: int, fragment_bytes: int = 16) -> bytes:
    """A HEADERS frame that never ends its header block, followed by `count` CONTINUATIONs that don't
    either (a header value that keeps growing)."""
    opening = (
        request_headers("GET", "/ping") + b"\x00" + _string(b"x-flood") + _integer(count * fragment_bytes, 7)
    )
    fragments = (frame(CONTINUATION, 0, stream_id, b"a" * fragment_bytes) for _ in range(count))
    return headers_frame(stream_id, opening, end_stream=True, end_headers=False) + b"".join(fragments)
