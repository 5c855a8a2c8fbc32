"""Host memory: the node's (psutil) and the container's (its cgroup's limit)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from service.serving.memory.cgroup import CgroupMemory, cgroup_memory


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int  # the node's RAM
    node_available_bytes: int
    process_rss_bytes: int
    cgroup: CgroupMemory | None  # the container's limit, where one applies

    @property
    def available_bytes(self) -> int:
        """What a load may still take: the node's available memory, or the room left
        under the container's limit where that is less."""
        if self.cgroup is None:
            return self.node_available_bytes
        return min(self.node_available_bytes, self.cgroup.available_bytes)


def host_memory() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(
        total_bytes=int(vm.total),
        node_available_bytes=int(vm.available),
        process_rss_bytes=int(psutil.Process().memory_info().rss),
        cgroup=cgroup_memory(),
    )
