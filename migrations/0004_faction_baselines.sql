-- The (faction, table) pairs whose rows the relay holds as upstream had them: the first reconcile of a
-- pair stores the rows it reads as the faction's state without events (a baseline), as Supabase
-- Realtime itself never replays a table's history to a new subscriber; later reconciles store each
-- difference as a `resync` event. Written in the transaction that stores the baseline's last rows.
-- `table_name` '*' stands for every table: a faction this relay served before baselines existed,
-- whose members have already seen its history as events; its differences stay events.
CREATE TABLE faction_baselines (
    faction_id  INTEGER NOT NULL,
    table_name  TEXT    NOT NULL,
    PRIMARY KEY (faction_id, table_name)
) WITHOUT ROWID;

INSERT INTO faction_baselines (faction_id, table_name)
    SELECT faction_id, '*' FROM subscriptions
    UNION
    SELECT DISTINCT faction_id, '*' FROM faction_rows;
