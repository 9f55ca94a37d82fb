"""Process-wide settings s2d makes at import.

glibc serves large allocations (above a dynamic threshold, at most 32 MB) with fresh ``mmap`` pages
and returns freed memory to the kernel, so every prefill's temporaries (activations, attention
scores) are faulted in anew: on a VM with slow page faults that made prefill tens of times slower
(benchmarks/RESULTS.md, "Measurements behind the code"). Raising the mmap threshold to 64 MB and never
trimming keeps freed blocks in the heap for the next call (the usual remedy inference servers get
from jemalloc or tcmalloc). The cost: the resident size stays at its peak. ``S2D_MALLOC_TUNE=0``
leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Apply the settings above on Linux with glibc; True when applied."""
    if os.environ.get("S2D_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: leave it alone
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
