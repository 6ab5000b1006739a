"""Plain-text pieces shared by the operator's commands: aligned tables, ages, times and sizes.

No colour and no cursor control, so the output reads the same in a terminal, a pipe, a log or a mail
from cron.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Final

MISSING: Final = "-"
ELLIPSIS: Final = "…"
COLUMN_GAP: Final = "  "
# (unit, seconds in it): an age is shown in the largest unit it fills, so "4m" rather than "240s".
AGE_UNITS: Final = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
SIZE_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")


def age(seconds: float | None) -> str:
    """How long ago, in one unit: "12s", "4m", "3h", "2d"; "-" for never. A clock running a little
    behind the one that stamped the time shows as "0s" rather than as a negative age."""
    if seconds is None:
        return MISSING
    whole = max(0, int(seconds))
    for unit, size in AGE_UNITS:
        if whole >= size:
            return f"{whole // size}{unit}"
    return "0s"


def age_since(at_ms: int | None, now_ms: int) -> str:
    return age(None if at_ms is None else (now_ms - at_ms) / 1000)


def iso_time(at_ms: int) -> str:
    """A wall-clock time in milliseconds as ISO 8601 UTC to the second: 2026-11-24T15:00:00Z."""
    moment = datetime.datetime.fromtimestamp(at_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def size(count: int) -> str:
    """Bytes in binary units, one decimal above a KiB: "512 B", "1.5 MiB"."""
    amount = float(count)
    for unit in SIZE_UNITS[:-1]:
        if amount < 1024:
            return f"{count} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} {SIZE_UNITS[-1]}"


def shorten(text: str, width: int) -> str:
    """The first line of `text`, cut to `width` characters with an ellipsis when longer."""
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 1] + ELLIPSIS


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns left-aligned and padded to their widest cell; the last column is never padded."""
    widths = [max(len(row[index]) for row in [headers, *rows]) for index in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append(COLUMN_GAP.join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)
