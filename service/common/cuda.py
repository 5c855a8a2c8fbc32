"""The narrow seam to CUDA: what a probe answers. Tests without a GPU swap in a fake
`CudaProbe`; loaders and workers use `service.common.torch_cuda.TorchCuda`, which asks
torch. This module imports no torch: the serving process reads these types too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
