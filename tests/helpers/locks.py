"""The dependency locks (requirements/*.txt, written by `make lock`) read as pip reads them, for the
tests that hold pyproject.toml, the locks and the pyz to one another."""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent.parent
RUNTIME_LOCK = REPO / "requirements" / "runtime.txt"
DEV_LOCK = REPO / "requirements" / "dev.txt"
BENCH_LOCK = REPO / "requirements" / "bench.txt"
# Each lock holds the one before it unchanged (the Makefile's `lock` compiles each within the last),
# so that the tests run on the versions the pyz ships.
LOCKS = (RUNTIME_LOCK, DEV_LOCK, BENCH_LOCK)
# What `make lock` resolves for: Debian 12's python3 on x86-64, where the pyz and CI run.
TARGET_PYTHON = "3.11"
TARGET_PLATFORM = "x86_64-manylinux_2_36"
TARGET_MARKERS = {"python_version": TARGET_PYTHON, "sys_platform": "linux", "platform_machine": "x86_64"}


@dataclass(frozen=True)
class LockedLine:
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> NormalizedName:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> Version | None:
        """The one version the line admits (`==`, no wildcard), or None when it is not pinned."""
        specifiers = list(self.requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
            return None
        return Version(specifiers[0].version)


@dataclass(frozen=True)
class Lock:
    path: Path
    command: list[str]  # the `uv pip compile` line of the header: what the file was compiled from and for
    options: list[str]  # pip's options in the file, such as `--only-binary :all:`
    lines: list[LockedLine]

    def pins(self) -> dict[NormalizedName, LockedLine]:
        return {line.name: line for line in self.lines}

    def extras(self) -> list[str]:
        return [value for flag, value in itertools.pairwise(self.command) if flag == "--extra"]


def read_lock(path: Path) -> Lock:
    """The header's command; then pip's logical lines: continuations joined, comments dropped, an
    option line apart from a requirement and its `--hash=` options."""
    text = path.read_text()
    command: list[str] = []
    for header in text.splitlines():
        if not header.startswith("#"):
            break
        if header.lstrip("# ").startswith("uv pip compile"):
            command = shlex.split(header.lstrip("# "))
    options: list[str] = []
    lines: list[LockedLine] = []
    for logical in text.replace("\\\n", " ").splitlines():
        line = logical.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        requirement, *hashes = line.split(" --hash=")
        lines.append(LockedLine(Requirement(requirement.strip()), tuple(value.strip() for value in hashes)))
    return Lock(path, command, options, lines)
