"""How a storage outage is logged: one line when writes start failing, one summary a minute while they
go on (with the count of failed writes, each a refused request or a change not stored), one when they
work again. A full disk used to log one ERROR per refused request.

Pure: the caller passes the time, so the schedule is tested without a clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# Often enough that an operator tailing the log sees the outage is still on, rarely enough that a
# flood of refused requests cannot fill the disk with the log of the disk being full.
SUMMARY_INTERVAL_S = 60.0


@dataclass(slots=True)
class OutageLog:
    log: logging.Logger
    name: str  # what the lines are prefixed with: the database's repr
    fault: str | None = None  # the first fault of the outage; None while writes work
    failed_total: int = 0
    failed_since_summary: int = 0
    summary_at: float = 0.0

    def failed(self, fault: str, now: float) -> None:
        if self.fault is None:
            self.log.error("%s: %s", self.name, fault)
            self.fault, self.failed_total, self.failed_since_summary = fault, 1, 0
            self.summary_at = now + SUMMARY_INTERVAL_S
            return
        self.failed_total += 1
        self.failed_since_summary += 1
        if now >= self.summary_at:
            self.log.warning(
                "%s: writes still failing: %d in the last %d s (%d in all; now: %s)",
                self.name,
                self.failed_since_summary,
                SUMMARY_INTERVAL_S,
                self.failed_total,
                fault,
            )
            self.failed_since_summary = 0
            self.summary_at = now + SUMMARY_INTERVAL_S

    def worked(self) -> None:
        if self.fault is None:
            return
        self.log.info(
            "%s: writes work again after %d failed (first: %s)", self.name, self.failed_total, self.fault
        )
        self.fault = None
