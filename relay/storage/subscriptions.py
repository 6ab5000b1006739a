"""Which factions the relay serves: each faction's subscription and last activity, answered from memory
and written through the database's one write connection.

A seam of its own: the `subscriptions` table shares nothing with the events but the write limiter
and the clock. Activity is kept in memory (`touch`) and written by `flush_activity` and `expire_idle`.

Idleness is measured on the monotonic clock, never the wall clock: a wall clock stepped forward past
the TTL (NTP, an operator's `date -s`) would otherwise expire every faction at once, and one stepped
back would keep them all alive. The stored `last_activity_at` (wall-clock ms, for people and /status)
cannot be compared across a restart either, so a restart counts as activity for every faction.

The ids of the known factions are also kept in a file beside the database (`relay.factions` beside
`relay.db`), rewritten whenever a faction becomes known. A relay that starts on an empty database
(deleted, lost, or replaced by an operator) takes them from there as factions on standby, so that the
first poll of today's script, which subscribes once per page and never again, revives its faction.
Only factions subscribed with a key ever get there: a poll alone still creates nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from relay.storage.database import Database

log = logging.getLogger(__name__)

# A faction's activity is only compared with a TTL of hours, so `touch` records it to the second: every
# poll and every woken stream touches, and most of them then cost a clock read and a comparison.
ACTIVITY_RESOLUTION_S = 1.0


@dataclass(frozen=True, slots=True)
class Subscription:
    """A faction the relay knows: active while it is served, inactive once expired or on standby."""

    faction_id: int
    active: bool
    subscribed_at: int
    last_activity_at: int


def known_factions_file(database: Path) -> Path:
    # Not relay.db-something: `rm relay.db*` is how an operator clears the database and its log.
    return database.with_suffix(".factions")


def load_subscriptions(conn: sqlite3.Connection) -> list[Subscription]:
    """The subscriptions table; when it is empty, first filled with the factions `known_factions_file`
    lists, on standby. Runs on the writer, at start."""
    # The database's own path, from SQLite: the store's loader hands this module only the connection.
    (_, _, filename) = conn.execute("PRAGMA database_list").fetchone()
    database = Path(filename)
    if not filename:  # a database in memory has nothing beside it
        pass
    elif conn.execute("SELECT count(*) FROM subscriptions").fetchone()[0] == 0:
        _recover_known_factions(conn, database)
    else:
        _write_known_factions(conn, database)  # a database from before the file, or the file lost
    return [
        Subscription(faction_id, bool(active), subscribed_at, last_activity_at)
        for faction_id, active, subscribed_at, last_activity_at in conn.execute(
            "SELECT faction_id, active, subscribed_at, last_activity_at FROM subscriptions"
        )
    ]


class Subscriptions:
    """Every faction ever subscribed, expired ones included. Its methods are the store's subscription
    methods, and documented there."""

    def __init__(
        self,
        database: Database,
        loaded: Iterable[Subscription],
        now_ms: Callable[[], int],
        monotonic_s: Callable[[], float],
    ) -> None:
        self._database = database
        self._now_ms = now_ms
        self._monotonic_s = monotonic_s
        self._subscriptions = {sub.faction_id: sub for sub in loaded}
        self._dirty_activity: set[int] = set()  # touched since the last flush
        # The monotonic time of each faction's latest activity in this process; what expiry compares.
        opened_at = monotonic_s()
        self._active_at = dict.fromkeys(self._subscriptions, opened_at)

    def __repr__(self) -> str:
        return f"<Subscriptions factions={len(self._subscriptions)}>"

    def __len__(self) -> int:
        return len(self._subscriptions)

    async def subscribe(self, faction_id: int) -> Subscription:
        known = self._subscriptions.get(faction_id)
        subscription = await self._activate(faction_id)
        if known is None or not known.active:  # one log line per change, not per page load
            log.info("%r: faction %d subscribed", self, faction_id)
        return subscription

    async def revive(self, faction_id: int) -> Subscription:
        subscription = await self._activate(faction_id, revived=True)
        log.info("%r: faction %d revived by a poll", self, faction_id)
        return subscription

    async def stand_by(self, faction_id: int) -> Subscription:
        known = self._subscriptions.get(faction_id)
        if known is not None:
            return known
        now = self._now_ms()

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO subscriptions (faction_id, active, subscribed_at, last_activity_at)"
                " VALUES (?, 0, ?, ?) ON CONFLICT (faction_id) DO NOTHING",
                (faction_id, now, now),
            )
            _write_known_factions(conn, self._database.path)

        await self._database.write(insert)
        # A subscribe may have activated the faction while this write waited its turn: it stays active.
        subscription = self._subscriptions.get(faction_id)
        if subscription is None:
            subscription = self._subscriptions[faction_id] = Subscription(faction_id, False, now, now)
            self._active_at[faction_id] = self._monotonic_s()
            log.info("%r: faction %d known, on standby", self, faction_id)
        return subscription

    async def _activate(self, faction_id: int, *, revived: bool = False) -> Subscription:
        now = self._now_ms()
        known = self._subscriptions.get(faction_id)
        subscription = Subscription(faction_id, True, known.subscribed_at if known else now, now)

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO subscriptions (faction_id, active, subscribed_at, last_activity_at)"
                " VALUES (?, 1, ?, ?) ON CONFLICT (faction_id) DO UPDATE"
                " SET active = 1, last_activity_at = excluded.last_activity_at",
                (faction_id, subscription.subscribed_at, now),
            )
            if known is None:
                _write_known_factions(conn, self._database.path)
            if revived:
                # Polled with a cursor from elsewhere (another instance that went away; see
                # deploy/nginx.conf): its members hold its history, and need what changed since as
                # events, so its first read here is not a baseline (0004_faction_baselines.sql).
                conn.execute(
                    "INSERT INTO faction_baselines (faction_id, table_name) SELECT ?, '*'"
                    " WHERE NOT EXISTS (SELECT 1 FROM faction_baselines WHERE faction_id = ?)",
                    (faction_id, faction_id),
                )

        await self._database.write(upsert)
        self._subscriptions[faction_id] = subscription
        self._active_at[faction_id] = self._monotonic_s()
        return subscription

    def get(self, faction_id: int) -> Subscription | None:
        return self._subscriptions.get(faction_id)

    def active(self) -> list[int]:
        return sorted(f for f, sub in self._subscriptions.items() if sub.active)

    def known(self) -> list[int]:
        return sorted(self._subscriptions)

    def touch(self, faction_id: int) -> None:
        subscription = self._subscriptions.get(faction_id)
        if subscription is None:
            return
        now = self._monotonic_s()
        if now - self._active_at[faction_id] >= ACTIVITY_RESOLUTION_S:
            self._active_at[faction_id] = now
            self._subscriptions[faction_id] = dataclasses.replace(
                subscription, last_activity_at=self._now_ms()
            )
            self._dirty_activity.add(faction_id)

    async def flush_activity(self) -> None:
        activity = self._activity_snapshot()
        if activity:
            await self._database.write(lambda conn: _write_activity(conn, activity))
            self._forget_flushed(activity)

    async def expire_idle(self, idle_for_ms: int) -> list[int]:
        cutoff = self._monotonic_s() - idle_for_ms / 1000
        idle = [
            f for f, sub in sorted(self._subscriptions.items()) if sub.active and self._active_at[f] < cutoff
        ]
        activity = self._activity_snapshot()
        if not idle and not activity:
            return []

        def expire(conn: sqlite3.Connection) -> None:
            _write_activity(conn, activity)
            conn.executemany("UPDATE subscriptions SET active = 0 WHERE faction_id = ?", [(f,) for f in idle])

        await self._database.write(expire)
        self._forget_flushed(activity)
        for faction_id in idle:
            self._subscriptions[faction_id] = dataclasses.replace(
                self._subscriptions[faction_id], active=False
            )
            log.info("%r: faction %d expired after %d ms without a request", self, faction_id, idle_for_ms)
        return idle

    def _activity_snapshot(self) -> dict[int, int]:
        return {f: self._subscriptions[f].last_activity_at for f in self._dirty_activity}

    def _forget_flushed(self, activity: dict[int, int]) -> None:
        # A faction touched again while the write ran stays dirty for the next flush.
        for faction_id, at in activity.items():
            if self._subscriptions[faction_id].last_activity_at == at:
                self._dirty_activity.discard(faction_id)


def _write_activity(conn: sqlite3.Connection, activity: dict[int, int]) -> None:
    conn.executemany(
        "UPDATE subscriptions SET last_activity_at = ? WHERE faction_id = ?",
        [(at, faction_id) for faction_id, at in activity.items()],
    )


def _write_known_factions(conn: sqlite3.Connection, database: Path) -> None:
    """Rewrite `known_factions_file` from the table, inside the transaction that made a faction known:
    the write thread runs one at a time, so the last file written lists every faction. A failure is
    logged, never fatal: the database itself holds the subscriptions."""
    ids = [faction_id for (faction_id,) in conn.execute("SELECT faction_id FROM subscriptions ORDER BY 1")]
    target = known_factions_file(database)
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("w", encoding="ascii") as file:
            file.write("".join(f"{faction_id}\n" for faction_id in ids))
            file.flush()
            os.fsync(file.fileno())
        partial.replace(target)
    except OSError as exc:
        log.warning("cannot write %s (kept for a restart on an empty database): %s", target, exc)


def _recover_known_factions(conn: sqlite3.Connection, database: Path) -> None:
    source = known_factions_file(database)
    try:
        ids = sorted({int(line) for line in source.read_text(encoding="ascii").split()})
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s, so no faction is known after this start: %s", source, exc)
        return
    ids = [faction_id for faction_id in ids if 0 < faction_id < 2**31]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO subscriptions (faction_id, active, subscribed_at, last_activity_at) VALUES (?, 0, strftime('%s') * 1000, strftime('%s') * 1000)",
        [(faction_id,) for faction_id in ids],
    )
    conn.execute("COMMIT")
    log.warning(
        "the database holds no subscription: %d factions known from %s are on standby, and each"
        " member's next poll revives its faction",
        len(ids),
        source,
    )
