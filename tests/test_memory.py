"""glibc keeps the registration's large arrays in the heap (scripts/inference/memory.py)."""

import ctypes
import ctypes.util

import numpy as np

from scripts.inference.memory import keep_freed_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def test_a_large_block_comes_from_the_heap_and_stays_there_after_free():
    assert keep_freed_memory() and keep_freed_memory()  # accepted, and a second call is harmless
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    size = 64 * 2**20  # above glibc's largest default mmap threshold (32 MB)
    before = libc.mallinfo2()
    block = np.ones(size // 8)
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    assert during.hblkhd - before.hblkhd < size // 2  # not a fresh mmap
    assert during.uordblks - before.uordblks >= size  # in the heap
    assert after.fordblks - during.fordblks >= size - 2**20  # freed but kept, not returned to the system
