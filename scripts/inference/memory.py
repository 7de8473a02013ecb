"""Keep freed memory in the process for reuse (glibc's allocator settings), set at the first registration of a process.

A registration allocates a few dozen arrays of 10-50 MB (fields and point grids on the 2-million-voxel
MR grid). glibc serves each block over 32 MB with a fresh ``mmap`` and returns it on ``free``, so every
such array pays the first touch of its pages again. On the virtual machines this bundle is measured on
(2-core cloud VMs) a first touch costs about 20 µs per 4 KiB page: 0.1-0.3 s per array
(``docs/speed.md``, "Memory pages"). Raising the mmap and trim thresholds keeps those pages in the heap
after ``free``; the process's resident memory stays at its peak (1.4 GB in ``benchmarks/latency.py``)
instead of shrinking between registrations. No well-kept Python library sets these, hence the ``ctypes`` call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers in glibc's malloc.h
_done: bool | None = None


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Ask glibc to serve blocks up to ``mmap_threshold`` bytes from the heap and to keep up to
    ``trim_threshold`` freed bytes; True when glibc accepted both (on other C libraries: False, no change).
    Only the first call acts; later calls return its outcome."""
    global _done
    if _done is None:
        _done = False
        name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)  # musl and non-glibc systems have none
        except OSError:
            mallopt = None
        if mallopt is not None:
            _done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
                mallopt(_M_TRIM_THRESHOLD, trim_threshold)
            )
        logging.getLogger(__name__).debug("glibc keeps freed memory: %s", _done)
    return _done
