"""The plain-text pieces of the operator's commands: ages in one unit, sizes, shortened text, tables."""

from __future__ import annotations

import pytest

from relay.ops.terminal import age, iso_time, shorten, size, table

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (-3, "0s"),
        (0.4, "0s"),
        (12, "12s"),
        (59.9, "59s"),
        (60, "1m"),
        (3599, "59m"),
        (3600, "1h"),
        (86_399, "23h"),
        (86_400, "1d"),
        (400 * 86_400, "400d"),
    ],
)
def test_an_age_is_shown_in_the_largest_unit_it_fills(seconds: float | None, shown: str) -> None:
    assert age(seconds) == shown


@pytest.mark.parametrize(
    ("count", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (45_056, "44.0 KiB"), (3 * 2**30, "3.0 GiB")],
)
def test_sizes_in_binary_units(count: int, shown: str) -> None:
    assert size(count) == shown


def test_times_are_iso_utc_to_the_second() -> None:
    assert iso_time(1_732_460_000_123) == "2024-11-24T14:53:20Z"


def test_shortened_text_keeps_its_first_line_within_the_width() -> None:
    assert shorten("short", 10) == "short"
    assert shorten("0123456789abc", 10) == "012345678…"
    assert shorten("first line\nTraceback ...", 40) == "first line"
    assert shorten("", 5) == ""


def test_a_table_pads_every_column_but_the_last() -> None:
    assert table(["A", "LONGER", "LAST"], [["1", "2", "three"], ["wide cell", "x", ""]]) == (
        "A          LONGER  LAST\n1          2       three\nwide cell  x"
    )
