"""Keeping freed memory for reuse while a capture runs (glibc only).

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A forward pass over long prompts allocates
such blocks all the time: one attention pattern of SmolLM2 over 1,000 tokens is 36 MB, and the
scores, softmax and products beside it as large. Every one of them is page-faulted in and zeroed
by the kernel, about 4 million page faults (16 GB) for four 1,000-token prompts, and the forward
pass spends about a third of its time there (measured: 16.4-18.2 s against 11.3-11.6 s with
freed memory kept; docs/store.md). TransformerLens runs the same way. torch's CPU allocator keeps
no cache of its own; its ``THP_MEM_ALLOC_ENABLE``, read once at start-up, asks for huge pages,
which makes the faults fewer (12.7 s here) but still zeroes every block.

:func:`freed_memory_kept` raises both thresholds for the length of a capture, so freed blocks
stay in the heap and are reused. The price is a higher peak: freed blocks do not always fit the
next request (capturing those prompts' attention patterns peaked at 1.9-2.0 GB instead of
1.6 GB, flat in the number of prompts). At the end the thresholds go back to the values glibc's
own dynamic adjustment reaches after large blocks are freed (32 MiB and 64 MiB), and
``malloc_trim`` hands the free memory back. The setting is process-wide: other threads allocate
under it too while a capture runs.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEPT = 2**31 - 1  # mallopt takes an int: blocks up to 2 GiB come from the heap
MMAP_AFTER = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where the dynamic threshold stops
TRIM_AFTER = 2 * MMAP_AFTER  # the dynamic adjustment keeps the trim threshold at twice it

_lock = threading.Lock()
_active = 0


def _glibc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Within the block, freed memory is kept for reuse instead of given back to the kernel.
    Yields whether the setting took effect (only with glibc). Nested and concurrent uses share
    one setting; the last to leave restores it."""
    global _active
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        ok = _active > 0 or (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(KEPT)) == 1
                             and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(KEPT)) == 1)
        if ok:
            _active += 1
        else:
            _restore(libc)
    if not ok:
        yield False
        return
    try:
        yield True
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _restore(libc)


def _restore(libc: Any) -> None:
    libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_AFTER))
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_AFTER))
    libc.malloc_trim(ctypes.c_size_t(0))
