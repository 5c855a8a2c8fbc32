"""Host memory via psutil."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    process_rss_bytes: int


def host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(
        total_bytes=int(vm.total),
        available_bytes=int(vm.available),
        process_rss_bytes=int(psutil.Process().memory_info().rss),
    )


def shared_memory_bytes() -> int:
    """The kernel's Shmem: tmpfs, /dev/shm and memfd pages (where arenas live), system-wide.
    An arena counts here until its last fd and mapping are gone, in whatever process."""
    return int(psutil.virtual_memory().shared)
