-- Faction state: each faction's current rows per upstream table, as the change events left them.
-- Written in the same transaction as the events that change it, so after a crash the rows and the
-- events agree. A key-only `old` (Postgres's default replica identity) is completed from here, and a
-- reconcile compares these rows with a snapshot read through Supabase's REST interface.
CREATE TABLE faction_rows (
    faction_id  INTEGER NOT NULL,
    table_name  TEXT    NOT NULL,
    row_key     TEXT    NOT NULL,   -- the key column's value as JSON text (7 and "7" differ)
    row         TEXT    NOT NULL,   -- the whole row, JSON
    PRIMARY KEY (faction_id, table_name, row_key)
) WITHOUT ROWID;

-- A DELETE from the shared unfiltered subscription carries only its key: find its faction.
CREATE INDEX faction_rows_by_key ON faction_rows (table_name, row_key);
