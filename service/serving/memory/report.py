"""The memory picture that dashboards poll: devices, host, and what each model holds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from service.common.cuda import CudaProbe
from service.serving.memory.host import host_memory
from service.serving.memory.nvml import GpuProbe, by_torch_index
from service.serving.memory.visible import listed_once


@dataclass(frozen=True)
class DeviceReport:
    id: str
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    torch_reserved_bytes: int
    torch_allocated_bytes: int
    held_bytes: int


@dataclass(frozen=True)
class HostReport:
    total_bytes: int
    available_bytes: int  # the node's (admission also keeps under the container's limit)
    process_rss_bytes: int
    shared_arena_bytes: int
    held_bytes: int
    container_limit_bytes: int | None  # the cgroup limit that binds (None: none applies)
    container_usage_bytes: int | None  # that cgroup's working set
    container_cgroup: str | None


@dataclass(frozen=True)
class ModelBytesReport:
    id: str
    by_device: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemorySnapshot:
    devices: list[DeviceReport]
    host: HostReport
    models: list[ModelBytesReport]


def _devices(cuda: CudaProbe, gpus: GpuProbe, held: dict[str, int]) -> list[DeviceReport]:
    """NVML's view of each GPU (all processes), with this process's torch figures."""
    torch_count = cuda.device_count()
    nvml = by_torch_index(gpus, cuda)
    devices = []
    for index in range(max(torch_count, len(nvml))):
        device_id = f"cuda:{index}"
        ours = cuda.memory(index) if index < torch_count else None
        gpu = nvml.get(index)
        if gpu is not None:
            name, total, free, used = gpu.name, gpu.total_bytes, gpu.free_bytes, gpu.used_bytes
        else:
            assert ours is not None
            name, total, free = ours.name, ours.total_bytes, ours.free_bytes
            used = total - free
        devices.append(
            DeviceReport(
                id=device_id,
                name=name,
                total_bytes=total,
                free_bytes=free,
                used_bytes=used,
                torch_reserved_bytes=ours.reserved_bytes if ours else 0,
                torch_allocated_bytes=ours.allocated_bytes if ours else 0,
                held_bytes=held.get(device_id, 0),
            )
        )
    return devices


def memory_snapshot(
    cuda: CudaProbe,
    gpus: GpuProbe,
    models: Iterable[tuple[str, dict[str, int]]],
    shared_arena_bytes: int = 0,
) -> MemorySnapshot:
    """Blocking (NVML and psutil): run it off the event loop. The GPUs are listed once."""
    cuda, gpus = listed_once(cuda, gpus)
    per_model = [ModelBytesReport(id=mid, by_device=dict(by)) for mid, by in models]
    held: dict[str, int] = {}
    for entry in per_model:
        for device, nbytes in entry.by_device.items():
            held[device] = held.get(device, 0) + nbytes
    devices = _devices(cuda, gpus, held)
    host = host_memory()
    return MemorySnapshot(
        devices=devices,
        host=HostReport(
            total_bytes=host.total_bytes,
            available_bytes=host.node_available_bytes,
            process_rss_bytes=host.process_rss_bytes,
            shared_arena_bytes=shared_arena_bytes,
            held_bytes=held.get("cpu", 0),
            container_limit_bytes=host.cgroup.limit_bytes if host.cgroup else None,
            container_usage_bytes=host.cgroup.usage_bytes if host.cgroup else None,
            container_cgroup=host.cgroup.path if host.cgroup else None,
        ),
        models=per_model,
    )
