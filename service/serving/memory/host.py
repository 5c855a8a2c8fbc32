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
