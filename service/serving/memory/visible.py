"""The serving process's view of CUDA devices, from NVML alone (it never initialises CUDA
nor imports torch): the GPUs CUDA_VISIBLE_DEVICES leaves visible, in PCI bus order, which
is the order loaders use too (they run with CUDA_DEVICE_ORDER=PCI_BUS_ID)."""

from __future__ import annotations

import os

from service.common.cuda import CudaDeviceMemory, CudaProbe
from service.serving.memory.nvml import GpuMemory, GpuProbe, Listing, Nvml


def visible(gpus: list[GpuMemory], setting: str | None) -> list[GpuMemory]:
    """What CUDA would enumerate under CUDA_VISIBLE_DEVICES=`setting` (None: unset): a
    comma-separated list of indices or UUID prefixes; CUDA stops at the first entry that
    names no device."""
    ordered = sorted(gpus, key=lambda gpu: gpu.index)
    if setting is None:
        return ordered
    chosen: list[GpuMemory] = []
    for entry in (part.strip() for part in setting.split(",")):
        if entry.lstrip("-").isdigit():
            index = int(entry)
            match = ordered[index] if 0 <= index < len(ordered) else None
        else:
            wanted = entry.lower()
            candidates = [g for g in ordered if g.uuid.lower().startswith(wanted)]
            match = candidates[0] if len(candidates) == 1 else None
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


class NvmlCuda:
    """`CudaProbe` without CUDA: counts, UUIDs and free memory from NVML. The serving
    process allocates nothing on a GPU, so its own allocated/reserved bytes are 0."""

    def __init__(self, probe: GpuProbe | None = None) -> None:
        self.probe = probe or Nvml()

    def _visible(self) -> list[GpuMemory]:
        return visible(self.probe.gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))

    def device_count(self) -> int:
        return len(self._visible())

    def uuids(self) -> list[str]:
        return [gpu.uuid for gpu in self._visible()]

    def memory(self, index: int) -> CudaDeviceMemory:
        gpu = self._visible()[index]
        return CudaDeviceMemory(
            index=index,
            name=gpu.name,
            total_bytes=gpu.total_bytes,
            free_bytes=gpu.free_bytes,
            allocated_bytes=0,
            reserved_bytes=0,
            uuid=gpu.uuid,
        )

    def empty_cache(self) -> None:
        return None


def listed_once(cuda: CudaProbe, gpus: GpuProbe) -> tuple[CudaProbe, GpuProbe]:
    """`cuda` and `gpus` for one request: NVML is listed once, and every question after
    (how many devices, their UUIDs, each one's memory) reads that listing. A `CudaProbe`
    that does not ask NVML (a test's stand-in) is asked as it is."""
    listing = Listing(gpus)
    if isinstance(cuda, NvmlCuda):
        cuda = NvmlCuda(listing if cuda.probe is gpus else Listing(cuda.probe))
    return cuda, listing
