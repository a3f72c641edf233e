"""Keep a long CPU pass's resident memory flat: large buffers mapped and unmapped, not heaped.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with
its own ``mmap``, returned to the kernel on ``free``. But each time such a block is freed, glibc
raises the threshold to its size (up to 32 MiB), so from then on the Inception network's
activation buffers (several MB each on the CPU) come from the heap arenas, where freed space is
reused imperfectly between batches of the 2+ torch threads and the arenas keep growing.
Measured on the reference path's stand-in Inception pass over 400 256x256 images
(docs/decisions.md, mmap threshold): peak anonymous memory went from 748 to 1,079 MB with
the default, and stayed at 704-726 MB from the first batches on with the threshold fixed at
128 KiB. :func:`bound_heap` fixes it (which also turns glibc's dynamic raise off) and trims the
heap above 128 KiB of free space. The price: every mapped buffer comes back as fresh zeroed
pages, ~15% more CPU time for a CPU Inception pass on the 2-core development machine (noisy;
``benchmarks/results/heap-creep-2026-11-30.json``); a GPU pass keeps its activations on the GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 << 10


@functools.cache
def bound_heap(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where not glibc (no-op).

    Process-wide and permanent (every later allocation); called once per process.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
