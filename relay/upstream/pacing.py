"""The reader first: under a flood, the store waits for the socket's reader, not the other way round.

A connection's reader (parsing frames) and its deliverer (handing batches to the store) share one CPU,
and the GIL, with the store's write thread. Left to share evenly, a flood the relay cannot store
whole made the reader fall seconds a second behind the socket: heartbeat replies came half a minute
late, and members were served rows half a minute old while every change was still being kept
(bench/RESULTS-flood.md). What members need under a flood is the newest rows, and the socket alive.

So the deliverer asks `ReaderFirst.turn()` before each batch. While the kernel holds more unread on
the socket than one read takes, the reader is behind, and the turn waits READER_SHARE times as long
as the last batch took (at most MAX_WAIT_S): the reader has ~90 % of the CPU until it has caught up.
Meanwhile the backlog fills and, past its bounds, drops its oldest, the faction is told `truncated`
and reconciled afterwards: the price of a socket read as fast as it comes.
"""

from __future__ import annotations

import fcntl
import sys
import termios
from collections.abc import Callable

import trio

# One read of the socket (the connection's receive buffer size): a reader that keeps up empties the
# socket on each pass, so more than this waiting means it did not. A larger fixed mark is not reached
# in practice: the kernel grows a socket's receive buffer only for a reader that keeps up, and one
# lagging seconds behind on loopback held 200 KiB.
READER_BEHIND_BYTES = 64 * 1024
# While behind, the next batch waits this many times as long as the last one took: the store gets
# a tenth of the time, the reader the rest (at 5,000 changes/s the reader alone needs ~85 % of a
# slow VM's core).
READER_SHARE = 9.0
# A reader that can never catch up must still see its newest changes stored now and then.
MAX_WAIT_S = 2.0
# How often a waiting turn looks at the socket again; caught up means two looks in a row, because a
# look between two of the reader's reads can find the socket nearly empty while it is far behind.
LOOK_EVERY_S = 0.01
LOOKS_TO_CATCH_UP = 2

Unread = Callable[[], int]


class ReaderFirst:
    """Paces one connection's deliveries to its reader: `await turn()` before a batch is handed on,
    `done()` once it has been."""

    def __init__(
        self,
        unread: Unread,
        *,
        behind_bytes: int = READER_BEHIND_BYTES,
        share: float = READER_SHARE,
        max_wait_s: float = MAX_WAIT_S,
        look_every_s: float = LOOK_EVERY_S,
    ) -> None:
        self._unread = unread
        self._behind_bytes = behind_bytes
        self._share = share
        self._max_wait_s = max_wait_s
        self._look_every_s = look_every_s
        self._behind = False
        self._last_took_s = 0.0
        self._started_at: float | None = None

    async def turn(self) -> None:
        if self._behind or self._unread() > self._behind_bytes:
            wait_s = min(self._max_wait_s, self._last_took_s * self._share)
            self._behind = not await self._caught_up_within(wait_s)
        self._started_at = trio.current_time()

    def done(self) -> None:
        if self._started_at is not None:
            self._last_took_s = trio.current_time() - self._started_at
            self._started_at = None

    async def _caught_up_within(self, wait_s: float) -> bool:
        deadline = trio.current_time() + wait_s
        looks = 0
        while True:
            looks = looks + 1 if self._unread() <= self._behind_bytes else 0
            if looks >= LOOKS_TO_CATCH_UP:
                return True
            if trio.current_time() >= deadline:
                return False
            await trio.sleep(min(self._look_every_s, deadline - trio.current_time()))


def unread_probe(stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> Unread:
    """How many bytes the kernel holds received on the stream's socket and not yet read (FIONREAD);
    0 once it is closed. TLS is read a record at a time, so what OpenSSL has decrypted and not handed
    on is one record at most: the kernel's count is the one that grows when the reader falls behind."""
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    sock = raw.socket
    count = bytearray(4)

    def unread() -> int:
        descriptor = sock.fileno()
        if descriptor < 0:  # closed: nothing more will be read from it
            return 0
        try:
            fcntl.ioctl(descriptor, termios.FIONREAD, count)
        except OSError:
            return 0
        return int.from_bytes(count, sys.byteorder, signed=True)

    return unread
