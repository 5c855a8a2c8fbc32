"""Give freed memory back to the OS (glibc keeps freed arenas otherwise) and to CUDA."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

from service.memory.cuda import CudaProbe


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 - absent on musl: fall back to gc only
    except (OSError, AttributeError):
        return None
    return lib


def release_memory(cuda: CudaProbe | None = None) -> None:
    gc.collect()
    if cuda is not None:
        cuda.empty_cache()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
