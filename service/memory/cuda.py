"""The narrow seam to CUDA. Tests without a GPU swap in a fake `CudaProbe`; the service
uses `TorchCuda`, which asks torch (imported when first asked: the settings and the CLI
import this module and need no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from types import ModuleType


def _torch() -> ModuleType:
    import torch

    return torch


@dataclass(frozen=True)
class CudaDeviceMemory:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    uuid: str = ""  # the device's UUID (NVML's "GPU-..." form); matches NVML's view


class CudaProbe(Protocol):
    def device_count(self) -> int: ...

    def uuids(self) -> list[str]:
        """Each visible device's UUID, by this process's index."""
        ...

    def memory(self, index: int) -> CudaDeviceMemory: ...

    def empty_cache(self) -> None: ...


class TorchCuda:
    def device_count(self) -> int:
        cuda = _torch().cuda
        return int(cuda.device_count()) if cuda.is_available() else 0

    def uuids(self) -> list[str]:
        cuda = _torch().cuda
        return [f"GPU-{cuda.get_device_properties(i).uuid}" for i in range(self.device_count())]

    def memory(self, index: int) -> CudaDeviceMemory:
        torch = _torch()
        free, total = torch.cuda.mem_get_info(index)
        return CudaDeviceMemory(
            index=index,
            name=torch.cuda.get_device_name(index),
            total_bytes=int(total),
            free_bytes=int(free),
            allocated_bytes=int(torch.cuda.memory_allocated(index)),
            reserved_bytes=int(torch.cuda.memory_reserved(index)),
            uuid=f"GPU-{torch.cuda.get_device_properties(index).uuid}",
        )

    def empty_cache(self) -> None:
        if self.device_count():
            cuda = _torch().cuda
            cuda.synchronize()
            cuda.empty_cache()
