"""glibc allocator settings for the two kinds of long runs (no-ops elsewhere).

A merge wants freed memory kept for the next tensor of the same size (``engine.stream._heap_reuse``);
collecting statistics wants freed memory returned, so that a long run's peak is what it
holds, not what its heap has fragmented into (``mapped_allocations``).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Any, Iterator, Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's, before its dynamic adjustment


def libc() -> Optional[Any]:
    """glibc, when this process runs on it and it has ``mallopt``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") else None


@contextlib.contextmanager
def mapped_allocations(threshold: int = 1024 ** 2) -> Iterator[None]:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping, returned on free.

    By default glibc raises its mapping threshold to the size of each mapped block freed (up
    to 32 MiB), after which such blocks come from the heap, whose freed holes are kept: over
    the hundreds of forward and backward passes of a calibration, activations, logits and
    gradients of a few MiB each fragment it, and resident memory creeps up (measured: Fisher
    statistics of a 0.91 GiB model peaked at 1.82-1.86 GiB by default, 1.77 GiB with this).
    Afterwards the threshold is glibc's initial 128 KiB again, fixed: setting it turns glibc's
    dynamic adjustment off for the rest of the process (a merge's ``engine.stream._heap_reuse`` turns
    mapping off altogether while it runs, so it is unaffected).
    """
    lib = libc()
    if lib is None:
        yield
        return
    lib.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        lib.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
        if hasattr(lib, "malloc_trim"):
            lib.malloc_trim(0)
