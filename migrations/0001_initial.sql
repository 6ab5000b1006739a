-- The relay's first schema. Plain table and column names, so that an operator can answer questions with
-- `sqlite3 data/relay.db 'select ...'` and no knowledge of the code. Times are integer milliseconds
-- since the Unix epoch, the same unit the HTTP API hands out as cursors.

-- One row per faction ever subscribed. An expired faction keeps its row with active = 0, so that its
-- next poll can revive it (today's userscript never re-subscribes), and so that after a restart the
-- active factions reopen their upstream sockets without any client asking.
CREATE TABLE subscriptions (
    faction_id       INTEGER PRIMARY KEY,
    active           INTEGER NOT NULL DEFAULT 1,
    subscribed_at    INTEGER NOT NULL,
    last_activity_at INTEGER NOT NULL
);

-- Every event served to clients. `timestamp` is the relay's receive time, made strictly increasing
-- across the whole relay, so it doubles as the cursor: UNIQUE states that, and catches a stamping bug
-- as a failed insert rather than as a client silently skipping an event. Without AUTOINCREMENT SQLite
-- may hand a deleted row's id out again; with it an id names one event for the life of the file.
-- `data` is the event's payload as JSON text, exactly as served.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    faction_id  INTEGER NOT NULL,
    timestamp   INTEGER NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    data        TEXT NOT NULL
);

-- Polls, trimming ("newest N of this faction") and the per-faction counts all read one faction's
-- events in time order.
CREATE INDEX events_faction_timestamp ON events (faction_id, timestamp);

-- The highest timestamp ever stamped or promised. A client's `since` can push the clock ahead of any
-- stored event (Lamport's rule); remembering that here keeps later events above it after a restart,
-- even when no event was stored in between or the machine's clock stepped back.
-- The CHECK keeps it to a single row.
CREATE TABLE relay_clock (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    high_water  INTEGER NOT NULL
);

INSERT INTO relay_clock (id, high_water) VALUES (1, 0);
