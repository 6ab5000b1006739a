"""Everything that talks to Supabase: the Realtime protocol, one connection's life, backoff, the
supervisors, PostgREST snapshots, reconciling and the shared DELETEs. Nothing here imports `relay.http`."""
