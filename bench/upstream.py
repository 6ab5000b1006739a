"""The benchmark's upstream: the fake Supabase Realtime server in a process of its own, emitting war calls.

It runs apart from the load generator so that thousands of client tasks cannot delay an upstream
frame (which would be charged to the relay), and apart from the relay so that the relay's CPU and
memory are measured alone. One INSERT per faction every `--interval-s`, staggered evenly, each row
carrying its emit time (`emitted_ns`, `time.time_ns()`). Driven over stdin/stdout, one line each way:

    (start-up)            -> "url ws://127.0.0.1:<port>/realtime/v1/websocket"
    "count <from> <to>"   -> JSON {"<faction_id>": emits with from <= emitted_ns < to}
    "stats"               -> JSON {"emitted", "max_lag_ms", "connections"}
    "quit" or end of stdin: exit (so the process never outlives the benchmark)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from relay.testing.fake_supabase import FakeSupabase

ANON_KEY = "bench-anon-key"
# 50 emits/s for 100 factions at 2 s: an hour of history, far more than one benchmark run needs.
EMITS_KEPT = 200_000
MAX_COMMAND_BYTES = 4096


class Emitter:
    def __init__(self, fake: FakeSupabase, factions: list[int], interval_s: float) -> None:
        self.fake = fake
        self.factions = factions
        self.interval_s = interval_s
        self.emits: deque[tuple[int, int]] = deque(maxlen=EMITS_KEPT)  # (faction_id, emitted_ns)
        self.max_lag_s = 0.0

    async def run(self, max_runtime_s: float) -> None:
        """One row per faction per interval, staggered: tick i goes to faction i mod F at t0 + i * slot."""
        slot = self.interval_s / len(self.factions)
        start = trio.current_time()
        ticks = int(max_runtime_s / slot)
        for tick in range(ticks):
            due = start + tick * slot
            await trio.sleep_until(due)
            self.max_lag_s = max(self.max_lag_s, trio.current_time() - due)
            self.emit(tick + 1, self.factions[tick % len(self.factions)])

    def emit(self, row_id: int, faction_id: int) -> None:
        emitted_ns = time.time_ns()
        row = {
            "id": row_id,
            "faction_id": faction_id,
            "war_id": 1,
            "target_id": 1_000_000 + row_id,
            "target_name": "target",
            "caller_id": 2_000_000 + row_id % 1000,
            "caller_name": "bench",
            "created_at": datetime.now(UTC).isoformat(),
            "emitted_ns": emitted_ns,
        }
        self.fake.insert("war_calls", row)
        self.fake.delete("war_calls", row_id, deliver=False)  # keep the fake's table from growing
        self.emits.append((faction_id, emitted_ns))

    def count(self, from_ns: int, to_ns: int) -> dict[str, int]:
        counts = {str(faction_id): 0 for faction_id in self.factions}
        for faction_id, emitted_ns in self.emits:
            if from_ns <= emitted_ns < to_ns:
                counts[str(faction_id)] += 1
        return counts


def answer(emitter: Emitter, line: str) -> str | None:
    """The reply to one command line, or None for quit."""
    words = line.split()
    if not words or words[0] == "quit":
        return None
    if words[0] == "count" and len(words) == 3:
        return json.dumps(emitter.count(int(words[1]), int(words[2])))
    if words[0] == "stats":
        stats = {
            "emitted": len(emitter.emits),
            "max_lag_ms": round(emitter.max_lag_s * 1000, 3),
            "connections": len(emitter.fake.connections),
        }
        return json.dumps(stats)
    return json.dumps({"error": f"unknown command {line!r}"})


async def serve_commands(answer_line: Callable[[str], str | None]) -> None:
    """Answer each line of stdin on stdout with `answer_line`, until it says None (quit) or stdin ends."""
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
            reply = answer_line(line.decode())
            if reply is None:
                return
            print(reply, flush=True)


async def main(args: argparse.Namespace) -> None:
    fake = FakeSupabase(valid_keys=(ANON_KEY,))
    factions = list(range(args.first_faction, args.first_faction + args.factions))
    emitter = Emitter(fake, factions, args.interval_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        print(f"url {fake.url}", flush=True)
        nursery.start_soon(emitter.run, args.max_runtime_s)
        await serve_commands(functools.partial(answer, emitter))
        nursery.cancel_scope.cancel()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--first-faction", type=int, default=46001)
    parser.add_argument("--factions", type=int, default=100)
    parser.add_argument("--interval-s", type=float, default=2.0)
    parser.add_argument("--max-runtime-s", type=float, default=3600.0)
    return parser.parse_args()


if __name__ == "__main__":
    try:
        trio.run(main, parse_args())
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the benchmark cleans up
        sys.exit(130)
