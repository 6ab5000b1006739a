"""glibc's malloc, told to give large blocks back to the system as soon as they are freed.

The relay's large allocations are short-lived: a 1 MiB upstream change is held as a frame, a string, a
parsed row and two encodings for a few milliseconds, a page of old events for one answer. By default
glibc raises its mmap threshold to the size of the largest block freed, so after the first such
change every later one comes from the heap, where freed space stays part of the process (the worst-case
load left 150 MB of it free but resident, `bench/RESULTS-budget.md`). A fixed threshold serves each
large block by its own mapping, returned on free; two arenas keep worker threads from growing heaps of
their own. Elsewhere (musl, macOS) this does nothing: the memory bounds hold, the RSS is a little higher.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks from this size on get their own mapping: above every small object and HTTP read buffer
# (64 KiB), below a published body (up to 256 KiB) and an upstream row (up to 1 MiB).
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENAS = 2


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
