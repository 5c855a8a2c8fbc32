"""The narrow seam to NVML (nvidia-ml-py): what the driver says each GPU holds, across
processes. Tests fake `GpuProbe`; without a driver `Nvml().gpus()` is empty."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from service.common.cuda import CudaProbe


@dataclass(frozen=True)
class GpuMemory:
    index: int  # NVML's index: all GPUs of the node, whatever CUDA_VISIBLE_DEVICES says
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    uuid: str  # "GPU-..." as NVML writes it


class GpuProbe(Protocol):
    def gpus(self) -> list[GpuMemory]: ...


class Listing:
    """The GPUs as one listing of `probe` saw them: every question asked of it reads that
    list, so one request (a scrape, an admission's probe) lists the GPUs once however
    many questions it asks."""

    def __init__(self, probe: GpuProbe) -> None:
        self._gpus = probe.gpus()

    def gpus(self) -> list[GpuMemory]:
        return list(self._gpus)


def same_gpu(a: str, b: str) -> bool:
    """NVML writes UUIDs as "GPU-xxxxxxxx-...", torch without the prefix."""
    return a.lower().removeprefix("gpu-") == b.lower().removeprefix("gpu-")


def by_torch_index(probe: GpuProbe, cuda: CudaProbe) -> dict[int, GpuMemory]:
    """NVML's GPUs keyed by this process's torch index, matched by UUID (torch indices
    follow CUDA_VISIBLE_DEVICES, NVML's do not). With no torch devices, NVML's indices."""
    gpus = probe.gpus()
    torch_uuids = cuda.uuids() if cuda.device_count() else []
    if not torch_uuids:
        return {gpu.index: gpu for gpu in gpus}
    matched = {}
    for index, uuid in enumerate(torch_uuids):
        gpu = next((g for g in gpus if same_gpu(g.uuid, uuid)), None)
        if gpu is not None:
            matched[index] = gpu
    return matched


def _pynvml() -> Any:
    import pynvml

    return pynvml


class Nvml:
    """`library`: the NVML bindings (default: pynvml, imported when first asked; tests pass
    a stand-in that counts what is asked of the driver)."""

    def __init__(self, library: Any = None) -> None:
        self._lock = threading.Lock()
        self._library = library
        self._module: Any = None
        self._failed = False

    def _nvml(self) -> Any:
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    library = self._library if self._library is not None else _pynvml()
                    library.nvmlInit()
                    self._module = library
                except Exception:  # no library, no driver, no GPU: no devices
                    self._failed = True
            return self._module

    def gpus(self) -> list[GpuMemory]:
        nvml = self._nvml()
        if nvml is None:
            return []
        result = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            result.append(
                GpuMemory(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_bytes=int(info.total),
                    free_bytes=int(info.free),
                    used_bytes=int(info.used),
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                )
            )
        return result
