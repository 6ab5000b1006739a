"""The scheduled upkeep: trim each faction's events, expire idle subscriptions, write the wall clock
down as the relay's clock (`Store.keep_up_with_the_wall_clock`), checkpoint the WAL.

The schedule (`run_schedule`) is kept apart from the pass (`maintenance_pass`) so that virtual-time
tests can check the timing without a database, and the pass can be tested without waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from relay.factions import Factions
from relay.storage.store import Store, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    events_trimmed: int
    factions_expired: tuple[int, ...]


async def run_schedule(
    interval_s: float,
    run_pass: Callable[[], Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `run_pass` every `interval_s`, on a fixed grid so that a slow pass does not push the next."""
    task_status.started()
    next_at = trio.current_time() + interval_s
    while True:
        await trio.sleep_until(next_at)
        await run_pass()
        # A pass that overran skips the grid points it missed instead of running back to back.
        now = trio.current_time()
        while next_at <= now:
            next_at += interval_s


async def maintenance_pass(
    store: Store, factions: Factions, *, subscription_ttl_s: float
) -> MaintenanceReport:
    """One pass; a storage fault is logged and the pass tried again at the next interval."""
    store.file_fault()  # logs a deleted or replaced database file even if nobody asks /health
    try:
        expired = await factions.expire_idle(subscription_ttl_s)
        trimmed = await store.trim()
        await store.keep_up_with_the_wall_clock()
        await store.checkpoint()
    except StoreError as exc:
        log.error("maintenance: storage fault, will retry next interval: %s", exc)
        return MaintenanceReport(0, ())
    report = MaintenanceReport(trimmed, tuple(expired))
    log.info(
        "maintenance: trimmed %d events, expired %d factions%s, checkpointed the WAL",
        trimmed,
        len(expired),
        f" {list(expired)}" if expired else "",
    )
    return report
