"""The reader first (issue 16 point 2): while the upstream socket holds more unread than one read,
each batch waits for the reader, nine times as long as the last batch took and two seconds at most,
until the reader is seen caught up twice in a row; and the probe reads the kernel's own count.

The policy runs on virtual time with a scripted socket; the probe on a real loopback socket.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.upstream.pacing import (
    LOOK_EVERY_S,
    MAX_WAIT_S,
    READER_BEHIND_BYTES,
    READER_SHARE,
    ReaderFirst,
    unread_probe,
)
from tests.helpers.waits import eventually

BEHIND = READER_BEHIND_BYTES + 1


class Socket:
    """A scripted count of unread bytes, and how often it was looked at."""

    def __init__(self, unread: int = 0) -> None:
        self.unread = unread
        self.looks = 0

    def __call__(self) -> int:
        self.looks += 1
        return self.unread


async def batch(pacing: ReaderFirst, store_s: float) -> float:
    """One batch: its turn, then `store_s` of storing. How long the turn waited."""
    asked = trio.current_time()
    await pacing.turn()
    waited = trio.current_time() - asked
    await trio.sleep(store_s)
    pacing.done()
    return waited


@pytest.mark.virtual_time
async def test_a_reader_that_keeps_up_never_holds_a_batch(autojump_clock: trio.abc.Clock) -> None:
    pacing = ReaderFirst(Socket(READER_BEHIND_BYTES))  # a full read waiting is not behind
    for _ in range(5):
        assert await batch(pacing, 0.3) == 0


@pytest.mark.virtual_time
async def test_while_the_reader_is_behind_the_store_gets_a_tenth_of_the_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    socket = Socket(BEHIND)
    pacing = ReaderFirst(socket)
    first = await batch(pacing, 0.1)
    assert first == 0  # nothing measured yet: the first batch goes at once, and is timed
    for _ in range(4):
        assert await batch(pacing, 0.1) == pytest.approx(0.1 * READER_SHARE)


@pytest.mark.virtual_time
async def test_a_reader_that_never_catches_up_still_sees_a_batch_every_two_seconds(
    autojump_clock: trio.abc.Clock,
) -> None:
    pacing = ReaderFirst(Socket(BEHIND))
    await batch(pacing, 1.0)
    for _ in range(3):
        assert await batch(pacing, 1.0) == pytest.approx(MAX_WAIT_S)


@pytest.mark.virtual_time
async def test_the_turn_ends_once_the_reader_is_seen_caught_up_twice_in_a_row(
    autojump_clock: trio.abc.Clock,
) -> None:
    socket = Socket(BEHIND)
    pacing = ReaderFirst(socket)
    await batch(pacing, 0.1)

    async def reader_catches_up(after_s: float) -> None:
        await trio.sleep(after_s)
        socket.unread = 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader_catches_up, 0.25)
        waited = await batch(pacing, 0.1)
    assert 0.25 <= waited <= 0.25 + 2 * LOOK_EVERY_S
    assert await batch(pacing, 0.1) == 0  # caught up: no longer behind, nothing held


@pytest.mark.virtual_time
async def test_one_look_at_an_empty_socket_between_two_reads_is_not_caught_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The reader takes 64 KiB at a time: a look just after a read finds the socket nearly empty
    while the reader is still far behind. Behind stays behind until two looks in a row say otherwise."""
    socket = Socket(BEHIND)
    pacing = ReaderFirst(socket)
    await batch(pacing, 0.1)

    async def flickers() -> None:
        while True:
            socket.unread = 0
            await trio.sleep(LOOK_EVERY_S / 2)
            socket.unread = BEHIND
            await trio.sleep(LOOK_EVERY_S * 1.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flickers)
        waits = [await batch(pacing, 0.1) for _ in range(3)]
        nursery.cancel_scope.cancel()
    assert waits == [pytest.approx(0.1 * READER_SHARE)] * 3


@pytest.mark.e2e
async def test_the_probe_reads_what_the_kernel_holds_unread_on_a_real_socket() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener, await trio.open_tcp_stream("127.0.0.1", port) as client:
        server = await listener.accept()
        async with server:
            unread = unread_probe(client)
            assert unread() == 0
            await server.send_all(b"x" * 10_000)
            await eventually(lambda: unread() == 10_000)
            received = 0
            while received < 10_000:
                received += len(await client.receive_some(65_536))
            assert unread() == 0
    assert unread() == 0  # closed: nothing more will be read, and no error
