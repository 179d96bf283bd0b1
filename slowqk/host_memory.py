"""glibc malloc settings for training on the CPU: keep freed blocks for reuse.

By default glibc serves every block above a moving threshold (128 KiB to 32 MiB) with its own
``mmap`` and returns it to the kernel on ``free``, so an activation that is freed and allocated
again every micro-batch faults its pages in afresh each time (measured on the 2-core CPU, tiny/gpt:
2,800-4,300 minor faults a step, 8-15 ms of system time). With a fixed 32 MiB threshold (the
largest glibc takes) and no trimming of the heap's top, those blocks come back from the heap
instead. The cost is that the process keeps its peak heap: what a training process does anyway.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: the heap's top stays

_applied: bool | None = None


def keep_freed_blocks() -> bool:
    """Apply the settings once per process; False where the C library is not glibc."""
    global _applied
    if _applied is None:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library already loaded
        if mallopt is None:
            _applied = False  # not glibc (musl, macOS): nothing to tune
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = (
                mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            )
    return _applied
