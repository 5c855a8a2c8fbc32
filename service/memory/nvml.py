"""The narrow seam to NVML (nvidia-ml-py): what the driver says each GPU holds, across
processes. Tests fake `GpuProbe`; without a driver `Nvml().gpus()` is empty."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


class GpuProbe(Protocol):
    def gpus(self) -> list[GpuMemory]: ...


class Nvml:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: Any = None
        self._failed = False

    def _nvml(self) -> Any:
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._module = pynvml
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
            result.append(
                GpuMemory(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total_bytes=int(info.total),
                    free_bytes=int(info.free),
                    used_bytes=int(info.used),
                )
            )
        return result
