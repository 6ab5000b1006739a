"""The short-polling benchmark's servers as child processes: the floor, the Node relay (the relay itself
comes from `bench.processes.open_relay`), where each runs (CPU pinning), and what the relay's
`/status` says about its factions.

Each child is owned by an async context manager that stops it on every way out (SIGTERM, then
SIGKILL after a bounded, shielded wait: `bench.processes.stop_process`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.processes import LISTENING, REPOSITORY, START_TIMEOUT_S, read_lines, stop_process

NODE_RELAY = REPOSITORY / "bench" / "peers" / "node-relay"
NPM_CI_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 120.0  # every upstream socket live and reconciled: 100 factions at 20 joins/s, then REST
POLL_S = 0.25
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Server:
    name: str
    pid: int
    url: str


async def ensure_node_modules() -> None:
    """`npm ci` in bench/peers/node-relay when its node_modules is missing (the lock file is committed)."""
    if (NODE_RELAY / "node_modules").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: the Node peer needs node and npm")
    print("bench: npm ci in bench/peers/node-relay", file=sys.stderr)
    with trio.fail_after(NPM_CI_TIMEOUT_S):
        await trio.run_process([npm, "ci", "--no-audit", "--no-fund"], cwd=str(NODE_RELAY))


@asynccontextmanager
async def open_server(name: str, command: Sequence[str], cwd: Path) -> AsyncIterator[Server]:
    """A server that prints "listening on <url>" on stdout once it accepts connections."""
    process = await trio.lowlevel.open_process(list(command), stdout=subprocess.PIPE, cwd=str(cwd))
    try:
        assert process.stdout is not None
        lines = read_lines(process.stdout)
        with trio.fail_after(START_TIMEOUT_S):
            async for line in lines:
                if match := LISTENING.search(line):
                    break
            else:
                raise RuntimeError(f"{name} exited before listening (its stderr is above)")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, lines)  # a full pipe would stall the server
            try:
                yield Server(name, process.pid, match.group(1))
            finally:
                await stop_process(process, signal.SIGTERM)
                nursery.cancel_scope.cancel()
    finally:
        await stop_process(process, signal.SIGTERM)


async def _drain(lines: AsyncIterator[str]) -> None:
    async for _ in lines:
        pass


def open_floor() -> AbstractAsyncContextManager[Server]:
    return open_server("floor", [sys.executable, "-m", "bench.peers.floor", "--port", "0"], REPOSITORY)


def open_node(seed_file: Path) -> AbstractAsyncContextManager[Server]:
    node = shutil.which("node") or "node"
    command = [node, "server.js", "--seed", str(seed_file), "--port", "0"]
    return open_server("node", command, NODE_RELAY)


def pin(pid: int, cpus: Collection[int]) -> None:
    """Every thread of `pid` (the relay's SQLite workers, Node's GC and libuv threads too) on `cpus`;
    threads made later inherit the affinity of the thread that makes them."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a worker thread that has just ended
            os.sched_setaffinity(int(tid), set(cpus))


async def get(client: httpx.AsyncClient, url: str) -> tuple[int, bytes]:
    with trio.fail_after(HTTP_TIMEOUT_S):
        response = await client.get(url)
    return response.status_code, response.content


async def relay_factions(client: httpx.AsyncClient, relay_url: str) -> list[dict[str, Any]]:
    with trio.fail_after(HTTP_TIMEOUT_S):
        response = await client.get(f"{relay_url}/status")
    if response.status_code != 200:
        raise RuntimeError(f"relay /status answered {response.status_code}: {response.text[:200]}")
    factions: list[dict[str, Any]] = response.json()["factions"]
    return factions


async def wait_until_reconciled(client: httpx.AsyncClient, relay_url: str, factions: Sequence[int]) -> None:
    """Until every faction's upstream is live and has been reconciled once (as in production, once
    its sockets are live the relay compares its rows with the fake's REST tables)."""
    wanted = set(factions)
    pending: list[int] = sorted(wanted)
    with trio.move_on_after(READY_TIMEOUT_S):
        while True:
            pending = [
                faction["faction_id"]
                for faction in await relay_factions(client, relay_url)
                if faction["faction_id"] in wanted
                and (faction["upstream"]["state"] != "connected" or not faction["reconcile"]["reconciles"])
            ]
            if not pending:
                return
            await trio.sleep(POLL_S)
    raise RuntimeError(
        f"{len(pending)} factions still not live and reconciled after {READY_TIMEOUT_S:g} s: {pending[:10]}"
    )


async def stored_counts(client: httpx.AsyncClient, relay_url: str) -> dict[int, int]:
    """Events stored per faction, as the relay's /status counts them in its database."""
    return {
        faction["faction_id"]: faction["events_stored"] for faction in await relay_factions(client, relay_url)
    }


async def reconcile_differences(client: httpx.AsyncClient, relay_url: str) -> dict[int, int]:
    """The factions whose last reconcile stored events (there should be none)."""
    return {
        faction["faction_id"]: faction["reconcile"]["differences"]
        for faction in await relay_factions(client, relay_url)
        if faction["reconcile"]["differences"]
    }
