"""Will it fit? An estimate against what is free on each target device, minus headroom."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.common.cuda import CudaProbe
from service.serving.memory.host import host_memory
from service.serving.memory.nvml import GpuProbe, by_torch_index


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


@dataclass(frozen=True)
class Measured:
    """What the probes said, taken before the registry's lock (psutil, NVML and CUDA
    calls can be slow): host available bytes and each GPU's free bytes by torch index."""

    host_available: int
    gpus_free: dict[int, int]


def measure(cuda: CudaProbe, gpus: GpuProbe) -> Measured:
    nvml = {index: gpu.free_bytes for index, gpu in by_torch_index(gpus, cuda).items()}
    free = {
        index: nvml[index] if index in nvml else cuda.memory(index).free_bytes
        for index in range(max(cuda.device_count(), len(nvml)))
    }
    return Measured(host_memory().available_bytes, free)


def free_bytes(
    budget: Budget, measured: Measured, held: dict[str, int], committed: dict[str, int]
) -> dict[str, int]:
    """Free bytes per device for a new load; `committed` is what queued/loading models will
    still take. Arithmetic only: `measured` was probed before."""
    if budget.host_budget_bytes is not None:
        host = budget.host_budget_bytes - held.get("cpu", 0)
    else:
        host = measured.host_available - budget.headroom_bytes
    free = {"cpu": host - committed.get("cpu", 0)}
    for index, raw in measured.gpus_free.items():
        device = f"cuda:{index}"
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
