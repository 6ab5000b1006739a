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
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from bench.processes import REPOSITORY, START_TIMEOUT_S, Upstream, read_lines, stop_process
from bench.upstream import ANON_KEY
from relay.testing.fake_supabase import FakeSupabase

MAX_COMMAND_BYTES = 4096


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


async def serve_commands(fake: FakeSupabase, rows: int) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stdin:
        while True:
            while b"\n" not in buffer:
                data = await stdin.receive_some(MAX_COMMAND_BYTES)
                if not data:
                    return
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            command = line.decode().strip()
            if command == "quit":
                return
            if command == "stats":
                stats = {
                    "connections": len(fake.connections),
                    "rest_requests": fake.rest_request_count,
                    "rows": rows,
                }
                print(json.dumps(stats), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


async def main(seed: dict[str, list[Any]]) -> None:
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    rows = load_rows(fake, seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        print(f"url {fake.url}", flush=True)
        await serve_commands(fake, rows)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_seeded_upstream(seed_path: Path) -> AsyncIterator[Upstream]:
    """This module in a process of its own; stopped (end of stdin, then killed) on every way out."""
    command = [sys.executable, "-m", "bench.seeded_upstream", "--seed", str(seed_path)]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPOSITORY)
    )
    try:
        assert process.stdout is not None
        replies = read_lines(process.stdout)
        with trio.fail_after(START_TIMEOUT_S):
            first = await anext(replies, "")
        if not first.startswith("url "):
            raise RuntimeError(
                f"bench.seeded_upstream said {first!r} instead of its url (its stderr is above)"
            )
        yield Upstream(process, first.removeprefix("url "), replies)
    finally:
        if process.stdin is not None:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()  # the upstream exits at the end of its stdin
        await stop_process(process, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seed", type=Path, required=True, help="the seed file bench.shortpoll wrote")
    try:
        trio.run(main, json.loads(parser.parse_args().seed.read_text()))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark cleans up
        sys.exit(130)
