"""A loader's freed blocks go back to the kernel: without the fixed mmap threshold, glibc
keeps blocks of the size it last unmapped in its heap, and memory freed there stays in the
process (the control run shows it does on this C library)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import ctypes, sys
from pathlib import Path

from service.loader.heap import unmap_when_freed

def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    assert unmap_when_freed()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 4 << 20
libc.free(libc.malloc(size))  # glibc raises its threshold to this size here
before = anon()
blocks = [libc.malloc(size) for _ in range(16)]
for block in blocks:
    ctypes.memset(block, 1, size)
guard = libc.malloc(64 << 10)  # above them in the heap: the heap's top cannot shrink
for block in blocks:
    libc.free(block)
print(anon() - before)
"""


def _kept(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def test_freed_blocks_leave_the_loader() -> None:
    if _kept("dynamic") < 32 << 20:
        pytest.skip("this C library returns freed heap blocks by itself (not glibc)")
    assert _kept("fixed") < 4 << 20
