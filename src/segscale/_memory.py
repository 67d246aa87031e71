"""Keep freed memory in the process: glibc's defaults make a CPU training step page-fault anew
through every activation it allocates."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a process frees for its own reuse.

    By default glibc maps large blocks (from 128 KiB; the threshold rises with use, up to 32 MiB)
    with mmap and unmaps them when freed, and trims the top of its heap: a training step then
    takes a fresh page fault, and a zeroed page, for every 4 KiB of activations it allocates
    (docs/performance.md, "Memory reuse on the CPU", has the step times with and without). Here
    every block comes from the heap, which is never trimmed: the process holds on to its peak
    memory, which a training loop reaches again every step anyway.

    Only on Linux with glibc (a no-op elsewhere), and not with SEGSCALE_KEEP_FREED_MEMORY=0 in the
    environment. Returns whether it applied; applying it again changes nothing."""
    if sys.platform != "linux" or os.environ.get("SEGSCALE_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # mmap off first, and trimming off only if that took: setting either one stops glibc from
    # raising its mmap threshold by itself, and trimming off alone would leave every block over
    # 128 KiB mapped, which faults more than the default.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
