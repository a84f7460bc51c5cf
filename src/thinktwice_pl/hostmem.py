"""The host (CPU) memory allocator: glibc's heap handed back to the system between phases."""

from __future__ import annotations

import os
import sys
from typing import Any


def trim_host_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    Freed heap blocks stay resident until a request of a fitting size reuses them. Phases alternate between shapes
    (short solve prompts, long refine prompts, growing KV caches, an update's activations), so without this the
    resident set keeps the high-water mark of every shape seen so far. Called after each generation and update pass;
    it costs milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


HOST_MMAP_THRESHOLD = 4 << 20  # bytes


def configure_host_allocator() -> None:
    """Serve host allocations of 4 MiB and more with their own mappings, returned to the system when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere, or when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment).

    glibc raises its threshold to the size of each mapped block that is freed, up to 32 MiB, so after the first
    logits chunks and KV buffers every tensor under 32 MiB would come from the heap, whose freed blocks stay
    resident. A fixed threshold keeps large tensors out of the heap."""
    if _LIBC is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)


_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _glibc() -> Any:
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only (not musl)


_LIBC = _glibc()
