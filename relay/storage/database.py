"""The database seam, after datasette's `Database`: SQLite connections and the worker threads they run in.

One write connection behind one `CapacityLimiter(1)`, so that writes run one at a time and in order,
and one read connection beside it; opening (creating and migrating) and a bounded close. Also what the
operator's commands share with the relay: the busy timeout, the files beside the database, its tables.
Errors: `StoreError` for any storage fault (its callers know it as `relay.storage.store.StoreError`);
`MigrationError` and `StaleWriteAheadLog` (`relay.storage.lineage`) from opening.
"""

from __future__ import annotations

import functools
import logging
import math
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from relay.storage.lineage import check_wal_belongs, database_mark, new_mark
from relay.storage.migrations import apply_migrations
from relay.storage.outage import OutageLog

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a statement waits on a lock held by another connection (the operator's sqlite3 shell, or
# our own reader during a checkpoint) before giving up; long enough to ride out a manual query.
BUSY_TIMEOUT_MS = 5_000
# At close, another connection's lock (an operator's sqlite3 shell) is waited for this long, not
# BUSY_TIMEOUT_MS, and the checkpoint is interrupted after CLOSE_CHECKPOINT_S: it only copies what the
# WAL holds already, durably, so cutting it short loses nothing and the next start has more to fold in.
CLOSE_BUSY_TIMEOUT_MS = 250
CLOSE_CHECKPOINT_S = 0.5
# Folds the WAL back into the database file and truncates it; waits for readers to let go.
CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"


class StoreError(Exception):
    """The database could not do what was asked; the relay's data is unchanged by the failed call."""


@dataclass(frozen=True, slots=True)
class FileSizes:
    database_bytes: int
    wal_bytes: int


def side_file(path: Path, suffix: str) -> Path:
    """SQLite's companion files sit beside the database: relay.db-wal, relay.db-shm."""
    return path.with_name(path.name + suffix)


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


async def open_database(path: Path, load: Callable[[sqlite3.Connection], T]) -> tuple[Database, T]:
    """Open (creating and migrating as needed) the database at `path`, and `load` from it what its
    owner keeps in memory, in one worker thread; nothing is left open on failure."""
    writer, reader, mark, loaded = await trio.to_thread.run_sync(_open, path, load)
    return Database(path, writer, reader, mark), loaded


class Database:
    """Create with `open_database`. Runs sync closures on its connections in worker threads, and
    remembers whether the last write worked (for health checks between real writes)."""

    def __init__(self, path: Path, writer: sqlite3.Connection, reader: sqlite3.Connection, mark: int) -> None:
        self.path = path
        self._mark = mark  # this file's lineage mark (relay.storage.lineage)
        # The file the connections have open. SQLite keeps writing to it after an operator deletes,
        # replaces or moves the path, and every commit from then on is lost at the next start.
        self._identity = _identity(path)
        self.file_fault: str | None = None  # why the path no longer leads to the open file
        self._writer, self._reader = writer, reader
        self._write_limiter = trio.CapacityLimiter(1)  # the single write limiter: writes in order
        self._read_limiter = trio.CapacityLimiter(1)
        self.write_fault: str | None = None  # why the last write failed; None when it worked
        self._outage = OutageLog(log, repr(self))
        self.last_write_at = -math.inf  # trio clock, when the last write ended

    def __repr__(self) -> str:
        return f"<Database {self.path.name}>"

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = True) -> T:
        """`fn(writer)` in a worker thread, in its own `BEGIN IMMEDIATE` transaction unless told not to."""
        # Never abandon_on_cancel: a write that was started must finish before anyone goes on.
        call = functools.partial(_in_transaction, fn) if transaction else fn
        try:
            result = await trio.to_thread.run_sync(call, self._writer, limiter=self._write_limiter)
        except sqlite3.Error as exc:
            fault = f"database write failed: {exc}"
            self._outage.failed(fault, trio.current_time())
            self.write_fault, self.last_write_at = fault, trio.current_time()
            raise StoreError(fault) from exc
        self._outage.worked()
        self.write_fault, self.last_write_at = None, trio.current_time()
        return result

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # A read changes nothing, so a cancelled caller may leave it running; the limiter stays held
        # until it ends, so the connection is still used by one thread at a time.
        try:
            return await trio.to_thread.run_sync(
                fn, self._reader, limiter=self._read_limiter, abandon_on_cancel=True
            )
        except sqlite3.Error as exc:
            raise StoreError(f"database read failed: {exc}") from exc

    async def checkpoint(self) -> None:
        def checkpoint(conn: sqlite3.Connection) -> None:
            conn.execute(CHECKPOINT).fetchall()
            # The log's next generation starts with page 1 and its mark: see relay.storage.lineage.
            conn.execute(f"PRAGMA user_version = {self._mark}")

        await self.write(checkpoint, transaction=False)

    def check_file(self) -> str | None:
        """Whether the path still leads to the file the relay has open: the reason when it does not,
        logged once per change. A `stat`, cheap enough for every /health."""
        try:
            now = _identity(self.path)
            # `cp backup relay.db` overwrites the same file in place: only its header tells.
            overwritten = now == self._identity and database_mark(self.path) != self._mark
        except FileNotFoundError:
            now, overwritten = None, False
        if now is None:
            fault = f"the database file {self.path} was deleted or moved away while the relay had it open"
        elif now != self._identity or overwritten:
            fault = f"the database file {self.path} was replaced by another file while the relay had it open"
        else:
            fault = None
        if fault != self.file_fault:
            if fault is not None:
                log.error("%r: %s; what is stored from now on is lost at the next start", self, fault)
            else:
                log.info("%r: the database file is back where it was", self)
            self.file_fault = fault
        return fault

    def file_sizes(self) -> FileSizes:
        """The database file and its write-ahead log, in bytes: a `stat` each, cheap enough to call
        from Trio. A checkpoint truncates the log; between checkpoints it grows."""
        return FileSizes(_size_or_zero(self.path), _size_or_zero(side_file(self.path, "-wal")))

    async def close(self, last_writes: Callable[[], Awaitable[object]]) -> None:
        """Run `last_writes`, checkpoint and close, bounded: another connection's lock is waited for
        CLOSE_BUSY_TIMEOUT_MS and the checkpoint CLOSE_CHECKPOINT_S at most. Both connections are
        closed whatever happens; a failed last write is logged, not raised."""
        checkpointed = False
        try:
            await self.write(
                lambda conn: conn.execute(f"PRAGMA busy_timeout = {CLOSE_BUSY_TIMEOUT_MS}"),
                transaction=False,
            )
            await last_writes()
            checkpointed = await self._final_checkpoint()
        except StoreError as exc:
            log.error("%r: closing without a final flush: %s", self, exc)
        finally:
            await trio.to_thread.run_sync(self._reader.close, limiter=self._read_limiter)
            if not checkpointed:
                # The last connection to close checkpoints the WAL itself, unboundedly: interrupted,
                # it leaves the rest to the next start instead.
                self._writer.interrupt()
            await trio.to_thread.run_sync(self._writer.close, limiter=self._write_limiter)

    async def _final_checkpoint(self) -> bool:
        """`checkpoint`, interrupted after CLOSE_CHECKPOINT_S (see there); whether it finished."""

        def checkpoint() -> bool:
            busy, _, _ = self._writer.execute(CHECKPOINT).fetchone()
            return bool(busy)

        async def interrupt_later() -> None:
            await trio.sleep(CLOSE_CHECKPOINT_S)
            self._writer.interrupt()  # nothing else writes now: only the checkpoint can be running

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_later)
            try:
                busy = await trio.to_thread.run_sync(checkpoint, limiter=self._write_limiter)
                outcome = "another connection is reading" if busy else None
            except sqlite3.Error as exc:  # "interrupted", once CLOSE_CHECKPOINT_S is up
                outcome = str(exc)
            finally:
                nursery.cancel_scope.cancel()
        if outcome is not None:
            log.warning(
                "%r: final checkpoint unfinished (%s); the next start folds the WAL in", self, outcome
            )
        return outcome is None


def _in_transaction(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection) -> T:
    # IMMEDIATE takes the write lock up front, so a busy database fails before anything is stamped.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except Exception:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False: each connection
    # is used by whichever worker thread holds its limiter, one at a time.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # FULL syncs the WAL on every commit: a crash (even power loss) loses no event a client has seen.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        if read_only:
            conn.execute("PRAGMA query_only = ON")
        elif conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise StoreError(f"{path} cannot use WAL mode (is it on a network filesystem?)")
    except Exception:
        conn.close()
        raise
    return conn


def _open(
    path: Path, load: Callable[[sqlite3.Connection], T]
) -> tuple[sqlite3.Connection, sqlite3.Connection, int, T]:
    """Both connections, migrated, the file's new lineage mark, and what `load` read through the writer."""
    opened: list[sqlite3.Connection] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_wal_belongs(path)  # before SQLite replays (and then checkpoints) a log onto the wrong file
        opened.append(_connect(path, read_only=False))
        apply_migrations(opened[0])
        mark = _mark_new_lineage(opened[0])
        opened.append(_connect(path, read_only=True))
        return opened[0], opened[1], mark, load(opened[0])
    except (OSError, sqlite3.Error) as exc:
        _close_all(opened)
        raise StoreError(f"cannot open the database {path}: {exc}") from exc
    except Exception:  # MigrationError, StoreError: already say what went wrong
        _close_all(opened)
        raise


def _mark_new_lineage(conn: sqlite3.Connection) -> int:
    """Fold the log into the file under a new mark, so that every later log carries it; keep the old
    mark when another connection's reader stops the fold: a log holding the new mark beside a file
    holding the old one would be refused at the next start as written for another copy."""
    (old,) = conn.execute("PRAGMA user_version").fetchone()
    (busy, _, _) = conn.execute(CHECKPOINT).fetchone()
    if busy:
        return int(old)
    mark = new_mark(old)
    conn.execute(f"PRAGMA user_version = {mark}")
    (busy, _, _) = conn.execute(CHECKPOINT).fetchone()
    if busy:
        conn.execute(f"PRAGMA user_version = {old}")
        return int(old)
    return mark


def _close_all(connections: list[sqlite3.Connection]) -> None:
    for conn in connections:
        conn.close()


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
