"""The operator's commands (`relay check-config`, `relay status`, `relay db stats`) and what they share;
only `relay.cli` imports them, and they never start the relay."""
