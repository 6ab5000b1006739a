"""`relay serve` in a real process, for the tests that need signals, kill -9 or OS-level faults."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

RELAY = str(Path(sys.executable).parent / "relay")
# Issue 13's bound on `relay serve`'s exit after SIGTERM (tests/test_shutdown.py), which
# deploy/cat-relay.service's TimeoutStopSec is set from (tests/test_deploy.py).
SHUTDOWN_BOUND_S = 5.0
LISTENING = re.compile(r"listening on (http://\S+)")


class RelayProcess:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.url = ""
        self._listening = trio.Event()
        self.log_ended = trio.Event()  # stderr closed: the process has written its last line

    async def collect_log(self) -> None:
        assert self.process.stderr is not None
        buffered = b""
        async for chunk in self.process.stderr:
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                self.log.append(line.decode())
                found = LISTENING.search(self.log[-1])
                if found and not self._listening.is_set():
                    self.url = found.group(1)
                    self._listening.set()
        self.log_ended.set()

    def text(self) -> str:
        return "\n".join(self.log)


@asynccontextmanager
async def relay_process(
    config: Path,
    env: dict[str, str],
    *,
    log_level: str = "INFO",
    command: Sequence[str] = (RELAY,),
    cwd: Path | None = None,
) -> AsyncIterator[RelayProcess]:
    """`command` is what runs `relay`: the venv's script, or an interpreter and the one-file build."""
    process = await trio.lowlevel.open_process(
        [*command, "--log-level", log_level, "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    running = RelayProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.collect_log)
            await running._listening.wait()
            yield running
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
