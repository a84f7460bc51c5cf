"""The host allocator (`thinktwice_pl.hostmem`): freed pages go back to the system."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

FRAGMENTED_HEAP = """
import torch
from thinktwice_pl.hostmem import trim_host_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # freed at once: glibc now serves blocks up to 8 MiB from its heap
base = rss()
blocks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(1) for _ in range(64)]  # 256 MiB on the heap
del blocks[:-1:2]  # 32 freed 4 MiB holes below live blocks: the heap cannot shrink from its top
held = rss() - base
trim_host_memory()
print(held, rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_trim_host_memory_returns_freed_heap_pages() -> None:
    """Between phases the freed tensors of a few MiB (activations, KV caches) stay resident in glibc's heap until
    trimmed: 128 MiB of holes among 128 MiB of live blocks go back to the system."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    held, trimmed = map(float, out.stdout.split())
    assert held == pytest.approx(256, abs=24)  # the holes are still resident
    assert trimmed == pytest.approx(128, abs=24)


_ALLOCATOR_CHECK = """
import ctypes, sys, torch
from thinktwice_pl.hostmem import configure_host_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
large = torch.empty(20 << 20, dtype=torch.uint8)
del large  # glibc raises its dynamic threshold to 20 MiB here
if sys.argv[1] == "configure":
    configure_host_allocator()
before = libc.mallinfo2().hblkhd
tensor = torch.empty(5 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - before
del tensor
print(mapped, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_host_allocator_returns_freed_tensors_of_4_mib_and_more_to_the_system() -> None:
    """glibc raises its mmap threshold to the size of each mapped block that is freed: after a 20 MiB tensor is
    freed, a 5 MiB one comes from the heap and stays resident once freed. `configure_host_allocator` fixes the
    threshold at 4 MiB, so the 5 MiB tensor is a mapping of its own (mallinfo2's hblkhd), unmapped when freed.
    A fresh process each: a heap that already holds a free block of that size serves it whatever the threshold."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    results = {}
    for mode in ("configure", "default"):
        done = subprocess.run(
            [sys.executable, "-c", _ALLOCATOR_CHECK, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        results[mode] = [int(x) for x in done.stdout.split()]
    assert results["configure"][0] >= 5 << 20 and results["configure"][1] == 0  # mapped, then unmapped
    assert results["default"][0] == 0  # glibc's own behaviour, which the call changes
