"""Freed memory kept for reuse during long evaluations and loops (glibc's malloc on Linux only;
elsewhere a no-op).

Evaluating a whole enumeration allocates and frees the same large activations chunk after chunk
(``[17,500, 256]``, 18 MB, for the 3-digit MLP). glibc gives freed memory at the top of its heap
back to the kernel once more than its trim threshold is free, so every chunk's fresh buffers
page-fault again: about 1.5 million minor faults, 10-20% of the time of a 50,000-problem
evaluation (``benchmarks/results/speed.md``). PyTorch's CPU tuning guide suggests jemalloc or
tcmalloc for this; :func:`keep_freed_memory` gets the same effect from glibc itself with two
``mallopt`` settings, and gives the memory back with ``malloc_trim`` when the outermost block ends.

After the first block the two thresholds stay set: mmap at 32 MiB (the ceiling glibc's own
dynamic threshold reaches once such a chunk is freed) and trim at twice that, and glibc's dynamic
adjustment is off. A process whose malloc is tuned by the user (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) or that sets ``SPARSECIRC_KEEP_FREED_MEMORY=0`` is
left alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
KEEP_FREED_BYTES = 1 << 30  # trim threshold inside a block: freed memory up to 1 GiB stays mapped
MMAP_THRESHOLD_BYTES = 32 << 20  # allocations below this come from the heap
TRIM_THRESHOLD_BYTES = 64 << 20  # after a block: twice the mmap threshold, where glibc's dynamic rule puts it
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0


def _glibc():
    """glibc's ``mallopt`` and ``malloc_trim`` if this process runs on them and the user has not
    tuned malloc, else ``None``. Never raises."""
    if (not sys.platform.startswith("linux") or os.environ.get("SPARSECIRC_KEEP_FREED_MEMORY") == "0"
            or any(name in os.environ for name in USER_SETTINGS)):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # the process's own C library
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (not musl)
        return libc.mallopt, libc.malloc_trim
    except Exception:
        return None


_GLIBC = _glibc()


@contextlib.contextmanager
def keep_freed_memory():
    """Inside the block, freed memory stays mapped for the next allocation instead of being
    returned to the kernel and faulted in again; on leaving the outermost block it is returned
    (``malloc_trim``). Blocks nest; results are unchanged (only where memory comes from)."""
    global _depth
    if _GLIBC is None:
        yield
        return
    mallopt, malloc_trim = _GLIBC
    with _lock:
        _depth += 1
        if _depth == 1:
            mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
                malloc_trim(0)
