"""Large answers (`/state` of a big faction: 67,025 rows are 59 MB) made and sent in bounded pieces.

A piece is about `PIECE_BYTES`. Each is made by one short call (the rows' stored texts joined, in
the store's worker thread) and handed to hypercorn alone, one checkpoint each, so that neither the
thread that builds the answer nor the loop that sends it holds the GIL for longer than a piece
takes: one `json.dumps` of the whole state held it for over half a second, and every member waited.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence

from quart import Response

from relay.http.responses import JSON_TYPE
from relay.storage.store import StateTexts

# The connection writes 256 KiB slices too (relay.http.server.WRITE_SLICE_BYTES).
PIECE_BYTES = 256 * 1024


def state_answer(faction_id: int, state: StateTexts, keys: Mapping[str, str]) -> list[bytes]:
    """`json.dumps({"faction_id", "timestamp", "tables", "keys"}, separators=(",", ":"))`, byte for
    byte, in pieces: each row is its stored text, which is that encoding of the row already."""
    pieces = _Pieces()
    pieces.add(b'{"faction_id":%d,"timestamp":%d,"tables":{' % (faction_id, state.timestamp))
    for place, (table, rows) in enumerate(state.tables.items()):
        pieces.add(b"%s%s:[" % (b"," if place else b"", _compact(table)))
        for index, row in enumerate(rows):
            if index:
                pieces.add(b",")
            pieces.add(row)
        pieces.add(b"]")
    pieces.add(b'},"keys":%s}' % _compact(dict(keys)))
    return pieces.done()


def pieces_response(pieces: Sequence[bytes]) -> Response:
    """A 200 answer of JSON already encoded in pieces, with its Content-Length: one body when it is
    one piece, else handed over a piece at a time."""
    if len(pieces) == 1:
        return Response(pieces[0], content_type=JSON_TYPE)

    async def each() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    length = sum(len(piece) for piece in pieces)
    return Response(each(), content_type=JSON_TYPE, headers={"Content-Length": str(length)})


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _Pieces:
    def __init__(self) -> None:
        self._done: list[bytes] = []
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def add(self, text: bytes) -> None:
        self._pending.append(text)
        self._pending_bytes += len(text)
        if self._pending_bytes >= PIECE_BYTES:
            self._flush()

    def done(self) -> list[bytes]:
        self._flush()
        return self._done

    def _flush(self) -> None:
        if self._pending:
            self._done.append(b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0
