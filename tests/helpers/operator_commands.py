"""Running the operator's commands (`relay check-config`, `status`, `db stats`) as an operator does: a
real process, its exit status, its stdout and stderr."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.helpers.relay_process import RELAY


@dataclass(frozen=True)
class Ran:
    status: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return self.err.strip().splitlines()


async def run_relay_command(
    *args: str | Path, variables: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Ran:
    """`relay *args` in this process's environment, which has no RELAY_* of the developer's
    (conftest's `no_relay_variables`), plus `variables`."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [RELAY, *map(str, args)],
            env={**os.environ, **(variables or {})},
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Ran(result.returncode, result.stdout.decode(), result.stderr.decode())
