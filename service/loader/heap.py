"""The loader's C heap: what a load frees goes back to the kernel at once.

glibc serves an allocation past its mmap threshold (128 KiB) with a mapping of its own,
unmapped when freed, but raises that threshold to the size of each such block freed (up
to 32 MiB): from then on, blocks that size come from its heaps, where freed memory stays
in the process. Quantizing a model allocates and frees a layer's temporaries over and over
(bitsandbytes, transformers' loading threads, each with a heap of its own), so a 4-bit
load would hold ~0.25× the model of freed memory beside the arena it writes. A loader
fixes the threshold at its default: every large block is unmapped when freed.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 128 * 1024


def unmap_when_freed(threshold: int = THRESHOLD) -> bool:
    """Fix the mmap threshold at `threshold` bytes; False where the C library has no
    mallopt or refuses it (then nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
