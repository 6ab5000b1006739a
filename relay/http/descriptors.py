"""The open-file budget: how many client connections the relay may hold, and refusing to start with
a limit that cannot cover `limits.max_held_requests`.

Every held long-poll and SSE stream is a descriptor, and so is every upstream socket, every REST
connection of a reconcile and every SQLite file. When client connections take them all, upstream
reconnects fail and the database cannot be opened, so the relay stops accepting clients before that
(`relay.http.server`) and keeps this reserve for itself.
"""

from __future__ import annotations

import resource

from relay.config import Config, ConfigError

# Per active faction: its upstream WebSocket and a REST connection while it reconciles.
DESCRIPTORS_PER_FACTION = 2
# The rest of the process: standard streams, the epoll and wake-up descriptors, listening sockets,
# the database, its WAL and shared-memory files for each SQLite connection, the REST client's pool
# of connections shared by relay-wide reads, and the log file an operator may point stderr at.
BASE_RESERVE = 64
# Beyond the held requests: room for plain polls, /status and /metrics while every hold is taken.
SPARE_FOR_POLLS = 64


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def reserved(config: Config) -> int:
    return BASE_RESERVE + DESCRIPTORS_PER_FACTION * config.limits.max_factions


def max_connections(config: Config, open_files: int) -> int:
    """Client connections the relay accepts at once; past this, new ones wait in the listen backlog."""
    return max(1, open_files - reserved(config))


def check_file_limit(config: Config, open_files: int) -> None:
    needed = config.limits.max_held_requests + SPARE_FOR_POLLS + reserved(config)
    if open_files < needed:
        raise ConfigError(
            f"limits.max_held_requests = {config.limits.max_held_requests} with limits.max_factions = "
            f"{config.limits.max_factions} needs {needed} open files, but the limit is {open_files}: "
            "raise it (LimitNOFILE= in the systemd unit, ulimit -n) or lower max_held_requests"
        )
