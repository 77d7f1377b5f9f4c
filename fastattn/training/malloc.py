"""glibc's malloc tuned for a training loop: freed memory stays in the process for reuse.

A training step allocates and frees the same tensors every step. With glibc's defaults a
freed block above the mmap threshold goes back to the OS (and the heap's free top is trimmed),
so the next step's tensor of that size is fresh memory again, zero-filled by the kernel one
page fault per 4 KiB: ~1100 faults and 2.4-3.2 ms of kernel CPU time a step at ``--preset
cpu_small`` (a 25-30 ms step), 1-3 faults with the settings below
(benchmarks/results/ab/trainer-20261208.md). The benchmarks' ``--steady-allocator`` does the
like through GLIBC_TUNABLES (read only when a process starts); here it is ``mallopt`` at run
time. The process keeps its peak heap instead of returning it, like a caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit): blocks above it are still
# mmapped and returned, so a one-off huge tensor does not pin its memory in the heap.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # an int: never trim in practice


def steady_malloc() -> str | None:
    """Set glibc's mmap threshold to 32 MiB and switch off heap trimming, process-wide.

    Returns a line saying what was set, or None where the C library is not glibc or refused
    (nothing changed). Idempotent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return None
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        return None
    return f"glibc {version} malloc: mmap threshold 32 MiB, no trimming (freed memory is reused)"
