"""The CUDA seam answered by torch, in the processes that import it (loaders, workers)."""

from __future__ import annotations

import torch

from service.common.cuda import CudaDeviceMemory


class TorchCuda:
    def device_count(self) -> int:
        cuda = torch.cuda
        return int(cuda.device_count()) if cuda.is_available() else 0

    def uuids(self) -> list[str]:
        cuda = torch.cuda
        return [f"GPU-{cuda.get_device_properties(i).uuid}" for i in range(self.device_count())]

    def memory(self, index: int) -> CudaDeviceMemory:
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
            cuda = torch.cuda
            cuda.synchronize()
            cuda.empty_cache()
