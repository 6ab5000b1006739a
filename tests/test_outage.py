"""The storage-outage log's schedule, with the time passed in: one line when writes start failing, a
summary a minute with the count while they go on, one line when they work again."""

from __future__ import annotations

import logging

import pytest

from relay.storage.outage import SUMMARY_INTERVAL_S, OutageLog

pytestmark = pytest.mark.unit

log = logging.getLogger("tests.outage")
FULL = "database write failed: database or disk is full"


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    found = [(r.levelno, r.getMessage()) for r in caplog.records]
    caplog.clear()
    return found


def test_an_outage_is_one_line_a_summary_a_minute_and_one_line_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    outage = OutageLog(log, "<Database relay.db>")
    outage.worked()
    assert lines(caplog) == []  # nothing to say while writes work

    for n in range(1_000):  # a thousand refused requests within the first minute
        outage.failed(FULL, now=100.0 + n * 0.05)
    assert lines(caplog) == [(logging.ERROR, f"<Database relay.db>: {FULL}")]

    outage.failed(FULL, now=100.0 + SUMMARY_INTERVAL_S)
    assert lines(caplog) == [
        (
            logging.WARNING,
            f"<Database relay.db>: writes still failing: 1000 in the last 60 s (1001 in all; now: {FULL})",
        )
    ]
    outage.failed(FULL, now=100.0 + SUMMARY_INTERVAL_S + 1)
    assert lines(caplog) == []

    outage.worked()
    assert lines(caplog) == [
        (logging.INFO, f"<Database relay.db>: writes work again after 1002 failed (first: {FULL})")
    ]
    outage.worked()
    outage.failed(FULL, now=1_000.0)  # a new outage starts with its own line
    assert [level for level, _ in lines(caplog)] == [logging.ERROR]
