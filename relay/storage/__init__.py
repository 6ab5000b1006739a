"""SQLite, async outside and threaded inside: the store, its database seam, the pure batch planner, row
state, subscriptions, the events kept in memory, migrations."""
