-- /health proves the database writable by committing a real change here. A write that changes
-- nothing is skipped by SQLite and would call a full disk healthy; one row, overwritten in place.
CREATE TABLE relay_health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at  INTEGER NOT NULL              -- ms since the epoch of the last successful probe
);

INSERT INTO relay_health (id, probed_at) VALUES (1, 0);
