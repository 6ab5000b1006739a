"""Memory given back as soon as it is free: glibc's malloc told to return large blocks to the system,
and the young garbage collected as soon as the process grows.

The relay's large allocations are short-lived: a 1 MiB upstream change is held as a frame, a string, a
parsed row and two encodings for a few milliseconds, a page of old events for one answer. By default
glibc raises its mmap threshold to the size of the largest block freed, so after the first such
change every later one comes from the heap, where freed space stays part of the process (the worst-case
load left 150 MB of it free but resident, `bench/RESULTS-budget.md`). A fixed threshold serves each
large block by its own mapping, returned on free; two arenas keep worker threads from growing heaps of
their own. Elsewhere (musl, macOS) this does nothing: the memory bounds hold, the RSS is a little higher.

Garbage in reference cycles (an httpx response and its stream, an exception and its frames) is freed
only by the cyclic collector, which `relay serve` runs rarely (`relay.cli.GC_THRESHOLDS`: polls
allocate fast). A cycle can hold megabytes (a REST snapshot page, a frame of large rows): 36 snapshot
answers of 5 MiB each were found waiting for a collection under the worst-case load. So the young
generations are also collected, whatever the allocation count, within a second of the process growing
by `GROWTH_BYTES`: large blocks are mappings of their own, so what such a cycle holds shows in the RSS
at once. Not every second regardless: a collection walks every young object still alive, and each
held long-poll is about 90 of them (its coroutines, tasks, scopes, its ASGI scope), alive for its
hold. Collected every second, 2,000 long-polling members cost 50 ms a second in collections
(bench.delivery); collected every 10 s, 100 ms pauses, as each collection walked every held request.
Small cyclic garbage is left to the collector's own thresholds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks from this size on get their own mapping: above every small object and HTTP read buffer
# (64 KiB), below a published body (up to 256 KiB) and an upstream row (up to 1 MiB).
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENAS = 2
COLLECT_EVERY_S = 1.0  # how often the growth is looked at
GROWTH_BYTES = 4 * 1024 * 1024  # over the lowest RSS since the last collection
# Generations 0 and 1: where a cycle made in the last moments is (the older objects are frozen at
# start or collected with generation 2 as usual).
YOUNG_GENERATIONS = 1
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def return_large_blocks_to_the_system() -> bool:
    """Whether glibc took the settings (False on another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: the allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_ARENA_MAX, ARENAS))


def resident_bytes() -> int | None:
    """The process's resident set (Linux), or None where /proc cannot say."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class YoungGarbage:
    """Collects the young generations when the process has grown (see the module's docstring);
    `look` is called every `COLLECT_EVERY_S`."""

    def __init__(self, rss: Callable[[], int | None] = resident_bytes) -> None:
        self._rss = rss
        self._lowest: int | None = None
        self.collections = 0

    async def look(self) -> None:
        resident = self._rss()
        if resident is not None and self._lowest is not None:
            self._lowest = min(self._lowest, resident)
            if resident - self._lowest < GROWTH_BYTES:
                return
        gc.collect(YOUNG_GENERATIONS)  # where the RSS cannot be read: every time, as before
        self.collections += 1
        self._lowest = self._rss()
