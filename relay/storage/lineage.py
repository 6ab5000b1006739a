"""Which database file a write-ahead log belongs to, checked before SQLite opens either.

SQLite replays a `-wal` onto whatever file sits beside it: a copy of relay.db restored over the file
a crashed relay left with its `-wal` gets the newer file's pages laid over older ones ("database disk
image is malformed", or worse, a database that looks fine and is not), and SQLite's first checkpoint
then writes that mixture into the restored copy. Nothing in SQLite's own formats ties a log to a file,
so the relay marks both: a random mark in the database header's `user_version`, new at every start
(`Database` writes it and folds it into the file), and written again after each checkpoint so that
every log generation the relay starts carries a copy of page 1 with it. A log whose last committed
page 1 carries another mark than the file's was written for another copy. A log without any page 1
(SQLite's own automatic checkpoints can start one) cannot be told apart and is let through.

Formats (https://www.sqlite.org/fileformat2.html#walformat): the log's 32-byte header holds the page
size and two salts; each frame is a 24-byte header (page number, the database size after a commit or
0, the salts, a running checksum) and a page. Frames whose salts or checksum do not follow on are
left over from an earlier generation, and SQLite ignores them and everything after; so do we.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

WAL_MAGIC_LITTLE_ENDIAN_CHECKSUMS = 0x377F0682
WAL_MAGIC_BIG_ENDIAN_CHECKSUMS = 0x377F0683
WAL_HEADER = struct.Struct(">8I")
FRAME_HEADER = struct.Struct(">6I")
# The database header's user_version: four bytes, big-endian, at this offset of page 1.
USER_VERSION_OFFSET = 60
DATABASE_HEADER_BYTES = 100
DATABASE_MAGIC = b"SQLite format 3\x00"
MARK_LIMIT = 2**31 - 1  # user_version is a signed 32-bit integer


class StaleWriteAheadLog(Exception):
    """The `-wal` beside the database was written for another copy of it; the message says what to do.
    Not a `StoreError`: its message is the whole advice, where a `StoreError`'s is only the fault."""


def new_mark(previous: int, rng: random.Random | None = None) -> int:
    draw = (rng or random.SystemRandom()).randint
    mark = draw(1, MARK_LIMIT)
    while mark == previous:
        mark = draw(1, MARK_LIMIT)
    return mark


def check_wal_belongs(path: Path) -> None:
    """Raise `StaleWriteAheadLog` when the log beside `path` carries another mark than the file."""
    wal = path.with_name(path.name + "-wal")
    file_mark = database_mark(path)
    if file_mark is None:
        return
    wal_mark = last_committed_mark(wal)
    if wal_mark is None or wal_mark == file_mark:
        return
    shm = path.with_name(path.name + "-shm")
    raise StaleWriteAheadLog(
        f"{wal} was written for another copy of {path.name} (was it restored or replaced after the relay"
        f" stopped without closing it?): to start from {path.name} as it is, delete {wal.name} and"
        f" {shm.name}; to keep what they hold instead, put back the {path.name} they were written for"
    )


def database_mark(path: Path) -> int | None:
    """The mark in the database file's header; None when the file is missing or not SQLite's."""
    try:
        with path.open("rb") as file:
            header = file.read(DATABASE_HEADER_BYTES)
    except FileNotFoundError:
        return None
    if len(header) < DATABASE_HEADER_BYTES or not header.startswith(DATABASE_MAGIC):
        return None  # SQLite refuses it itself, in words of its own
    (mark,) = struct.unpack_from(">I", header, USER_VERSION_OFFSET)
    return int(mark)


def last_committed_mark(wal: Path) -> int | None:
    """The mark in the newest committed copy of page 1 in the log, or None when it holds none. Read a
    frame at a time: a log can be far larger than the relay's memory budget allows at once."""
    try:
        file = wal.open("rb")
    except FileNotFoundError:
        return None
    with file:
        header = file.read(WAL_HEADER.size)
        if len(header) < WAL_HEADER.size:
            return None
        magic, _, page_size, _, salt1, salt2, check1, check2 = WAL_HEADER.unpack(header)
        if magic not in (WAL_MAGIC_LITTLE_ENDIAN_CHECKSUMS, WAL_MAGIC_BIG_ENDIAN_CHECKSUMS):
            return None
        order = ">" if magic == WAL_MAGIC_BIG_ENDIAN_CHECKSUMS else "<"
        sums = _checksum(order, header[:24], 0, 0)
        if sums != (check1, check2):
            return None
        committed: int | None = None
        pending: int | None = None  # page 1's mark as of the frames read so far, committed or not
        while len(frame := file.read(FRAME_HEADER.size + page_size)) == FRAME_HEADER.size + page_size:
            page, size_after, frame_salt1, frame_salt2, frame_check1, frame_check2 = FRAME_HEADER.unpack_from(
                frame
            )
            sums = _checksum(order, frame[:8] + frame[FRAME_HEADER.size :], *sums)
            if (frame_salt1, frame_salt2) != (salt1, salt2) or sums != (frame_check1, frame_check2):
                break
            if page == 1:
                (pending,) = struct.unpack_from(">I", frame, FRAME_HEADER.size + USER_VERSION_OFFSET)
            if size_after != 0 and pending is not None:
                committed = pending
    return committed


def _checksum(order: str, data: bytes, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for first, second in zip(words[0::2], words[1::2], strict=True):
        s0 = (s0 + first + s1) & 0xFFFFFFFF
        s1 = (s1 + second + s0) & 0xFFFFFFFF
    return s0, s1
