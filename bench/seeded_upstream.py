"""A quiet fake Supabase for the short-polling benchmark: no traffic, and REST tables holding the rows
the relay was seeded with, so its sockets are live as in production and its reconciles find nothing
to change (a row the fake lacked would come back as a DELETE "resync" event and move the data set).

    (start-up)            -> "url ws://127.0.0.1:<port>/realtime/v1/websocket"
    "stats"               -> JSON {"connections", "rest_requests", "rows"}
    "quit" or end of stdin: exit (so the process never outlives the benchmark)

    python -m bench.seeded_upstream --seed seed.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from bench.processes import Upstream, open_upstream_process
from bench.upstream import ANON_KEY, serve_commands
from relay.testing.fake_supabase import FakeSupabase


def load_rows(fake: FakeSupabase, seed: dict[str, list[Any]]) -> int:
    """Insert (without delivering) the row of every seeded INSERT; how many."""
    count = 0
    for events in seed.values():
        for event in events:
            data = event["data"]
            if event["type"] == "postgres_changes" and data["eventType"] == "INSERT":
                fake.insert(data["table"], data["new"], deliver=False)
                count += 1
    return count


def answer(fake: FakeSupabase, rows: int, line: str) -> str | None:
    """The reply to one command line, or None for quit."""
    command = line.strip()
    if command == "quit":
        return None
    if command == "stats":
        stats = {"connections": len(fake.connections), "rest_requests": fake.rest_request_count, "rows": rows}
        return json.dumps(stats)
    return json.dumps({"error": f"unknown command {command!r}"})


async def main(seed: dict[str, list[Any]]) -> None:
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    rows = load_rows(fake, seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        print(f"url {fake.url}", flush=True)
        await serve_commands(functools.partial(answer, fake, rows))
        nursery.cancel_scope.cancel()


def open_seeded_upstream(seed_path: Path) -> AbstractAsyncContextManager[Upstream]:
    """This module in a process of its own; stopped (end of stdin, then killed) on every way out."""
    return open_upstream_process(["bench.seeded_upstream", "--seed", str(seed_path)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seed", type=Path, required=True, help="the seed file bench.shortpoll wrote")
    try:
        trio.run(main, json.loads(parser.parse_args().seed.read_text()))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark cleans up
        sys.exit(130)
