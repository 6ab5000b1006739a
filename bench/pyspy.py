"""A py-spy profile of a running Python server and its text summary: where its samples were, by
function (self and inclusive) and by package, for a results file.

py-spy pauses the target for each sample (without `--nonblocking`, whose unpaused reads tore about a
third of the stacks here), so a profiled run is slower and never counted; `--format raw` writes one line per distinct stack,
`frame;frame;...;leaf count`, each frame `function (path:line)`.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trio

SAMPLES_PER_S = 200
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::\d+)?\)$")
PYSPY_MARGIN_S = 30.0
EVERYWHERE = 0.98  # a function in this share of the samples is a root frame, not a finding


@dataclass(frozen=True)
class Profile:
    samples: int
    self_counts: Counter[str]  # function (path) -> samples with it as the leaf
    total_counts: Counter[str]  # function (path) -> samples with it anywhere in the stack
    package_counts: Counter[str]  # package of the leaf -> samples


def pyspy_command(pid: int, duration_s: float, output: Path) -> list[str]:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    command = [pyspy, "record", "--rate", str(SAMPLES_PER_S), "-p", str(pid)]
    return [*command, "-d", str(math.ceil(duration_s)), "-f", "raw", "-o", str(output)]


async def record(pid: int, duration_s: float, output: Path) -> str:
    """Sample `pid` for `duration_s` into `output`; its raw stacks."""
    with trio.fail_after(duration_s + PYSPY_MARGIN_S):
        done = await trio.run_process(
            pyspy_command(pid, duration_s, output), capture_stdout=True, capture_stderr=True, check=False
        )
    if done.returncode != 0 or not await trio.Path(output).exists():
        raise RuntimeError(f"py-spy exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return await trio.Path(output).read_text()


def _function(frame: str) -> str:
    match = FRAME.match(frame.strip())
    return f"{match['function']} ({match['path']})" if match else frame.strip()


def _package(function: str) -> str:
    match = FRAME.match(function)
    path = match["path"] if match else ""
    if path.startswith("<"):
        return "python (frozen/builtin)"
    first = path.split("/", 1)[0]
    return first.removesuffix(".py") if "/" in path or path.endswith(".py") else "other"


def summarize(raw: str) -> Profile:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    package_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = [_function(frame) for frame in stack.split(";")]
        samples += count
        self_counts[functions[-1]] += count
        package_counts[_package(functions[-1])] += count
        for function in set(functions):
            total_counts[function] += count
    return Profile(samples, self_counts, total_counts, package_counts)


def summary_lines(profile: Profile, top: int) -> list[str]:
    """Markdown: the top functions by self samples, by inclusive samples, and self samples by package."""

    def share(count: int) -> str:
        return f"{100 * count / profile.samples:.1f}"

    lines = [f"{profile.samples} samples.", "", "| self % | function (file) |", "|---|---|"]
    lines += [f"| {share(n)} | `{function}` |" for function, n in profile.self_counts.most_common(top)]
    # The frames under every sample (the module, trio.run, ...) say nothing: left out.
    inclusive = [(f, n) for f, n in profile.total_counts.most_common() if n < EVERYWHERE * profile.samples]
    lines += ["", "| inclusive % | function (file) |", "|---|---|"]
    lines += [f"| {share(n)} | `{function}` |" for function, n in inclusive[:top]]
    lines += ["", "| self % | package |", "|---|---|"]
    lines += [f"| {share(n)} | {package} |" for package, n in profile.package_counts.most_common()]
    return lines
