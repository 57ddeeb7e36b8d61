"""Process-level memory settings (no paddle).

glibc raises its mmap threshold each time a large block is freed, after which blocks of up to
32 MB come from the heap instead, where windows of varying size fragment it: resident memory
then creeps up window after window (measured: +27% from 200k to 2M pairs). Fixing the threshold
at 128 KiB keeps large arrays in mmap'ed memory that goes back to the system when freed, and two
arenas are enough for our few threads. Measured with scripts/bench_memory.py (README "Measured").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def limit_heap_fragmentation(mmap_threshold: int = 128 * 1024, arena_max: int = 2) -> bool:
    """Apply the settings above on glibc; returns False (and does nothing) elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_ARENA_MAX, arena_max))


def release_free_memory() -> None:
    """Hand memory that glibc holds free back to the system (malloc_trim also releases free
    pages inside the heap, not only at its top). Called once per committed window: a few ms."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
