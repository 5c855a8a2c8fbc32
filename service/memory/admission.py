"""Will it fit? An estimate against what is free on each target device, minus headroom."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.memory.cuda import CudaProbe
from service.memory.host import host_memory
from service.memory.nvml import GpuProbe, by_torch_index


@dataclass(frozen=True)
class Shortfall:
    device: str
    needed_bytes: int
    free_bytes: int

    def __str__(self) -> str:
        return (
            f"{self.device}: needs {_gib(self.needed_bytes)}, {_gib(max(self.free_bytes, 0))} free"
        )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Budget:
    headroom_bytes: int
    host_budget_bytes: int | None


def free_bytes(
    budget: Budget, cuda: CudaProbe, gpus: GpuProbe, held: dict[str, int], committed: dict[str, int]
) -> dict[str, int]:
    """Free bytes per device for a new load; `committed` is what queued/loading models will
    still take."""
    if budget.host_budget_bytes is not None:
        host = budget.host_budget_bytes - held.get("cpu", 0)
    else:
        host = host_memory().available_bytes - budget.headroom_bytes
    free = {"cpu": host - committed.get("cpu", 0)}
    nvml = {index: gpu.free_bytes for index, gpu in by_torch_index(gpus, cuda).items()}
    for index in range(max(cuda.device_count(), len(nvml))):
        device = f"cuda:{index}"
        raw = nvml[index] if index in nvml else cuda.memory(index).free_bytes
        free[device] = raw - budget.headroom_bytes - committed.get(device, 0)
    return free


def shortfalls(needed: dict[str, int], free: dict[str, int]) -> list[Shortfall]:
    return [
        Shortfall(device, nbytes, free.get(device, 0))
        for device, nbytes in needed.items()
        if device != "disk" and nbytes > free.get(device, 0)
    ]


def add(totals: Iterable[dict[str, int]]) -> dict[str, int]:
    result: dict[str, int] = {}
    for by_device in totals:
        for device, nbytes in by_device.items():
            result[device] = result.get(device, 0) + nbytes
    return result
