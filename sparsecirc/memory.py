"""Freed memory kept for reuse during a long evaluation (glibc's malloc only; elsewhere a no-op).

Evaluating a whole enumeration allocates and frees the same large activations chunk after chunk
(``[17,500, 256]``, 18 MB, for the 3-digit MLP). glibc gives freed memory at the top of its heap
back to the kernel once more than its trim threshold is free, so every chunk's fresh buffers
page-fault again: about 1.5 million minor faults, 10-20% of the time of a 50,000-problem
evaluation (``benchmarks/results/speed.md``). PyTorch's CPU tuning guide suggests jemalloc or
tcmalloc for this; :func:`keep_freed_memory` gets the same effect from glibc itself with two
``mallopt`` settings, and gives the memory back with ``malloc_trim`` when the outermost block ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
KEEP_FREED_BYTES = 1 << 30  # trim threshold inside a block: freed memory up to 1 GiB stays mapped
MMAP_THRESHOLD_BYTES = 32 << 20  # allocations below this come from the heap: the ceiling of glibc's own dynamic threshold
TRIM_THRESHOLD_BYTES = 64 << 20  # after a block: twice the mmap threshold, where glibc's dynamic rule would put it

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The C library if it is glibc (it has ``mallopt`` and ``malloc_trim``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


@contextlib.contextmanager
def keep_freed_memory():
    """Inside the block, freed memory stays mapped for the next allocation instead of being
    returned to the kernel and faulted in again; on leaving the outermost block it is returned
    (``malloc_trim``). Blocks nest; results are unchanged (only where memory comes from)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
                _LIBC.malloc_trim(0)
