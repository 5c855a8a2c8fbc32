"""The memory picture that dashboards poll: devices, host, and what each model holds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from service.memory.cuda import CudaProbe
from service.memory.host import host_memory


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
    available_bytes: int
    process_rss_bytes: int
    shared_arena_bytes: int
    held_bytes: int


@dataclass(frozen=True)
class ModelBytesReport:
    id: str
    by_device: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemorySnapshot:
    devices: list[DeviceReport]
    host: HostReport
    models: list[ModelBytesReport]


def memory_snapshot(
    cuda: CudaProbe, models: Iterable[tuple[str, dict[str, int]]], shared_arena_bytes: int = 0
) -> MemorySnapshot:
    per_model = [ModelBytesReport(id=mid, by_device=dict(by)) for mid, by in models]
    held: dict[str, int] = {}
    for entry in per_model:
        for device, nbytes in entry.by_device.items():
            held[device] = held.get(device, 0) + nbytes
    devices = []
    for index in range(cuda.device_count()):
        mem = cuda.memory(index)
        device_id = f"cuda:{index}"
        devices.append(
            DeviceReport(
                id=device_id,
                name=mem.name,
                total_bytes=mem.total_bytes,
                free_bytes=mem.free_bytes,
                used_bytes=mem.total_bytes - mem.free_bytes,
                torch_reserved_bytes=mem.reserved_bytes,
                torch_allocated_bytes=mem.allocated_bytes,
                held_bytes=held.get(device_id, 0),
            )
        )
    host = host_memory()
    return MemorySnapshot(
        devices=devices,
        host=HostReport(
            total_bytes=host.total_bytes,
            available_bytes=host.available_bytes,
            process_rss_bytes=host.process_rss_bytes,
            shared_arena_bytes=shared_arena_bytes,
            held_bytes=held.get("cpu", 0),
        ),
        models=per_model,
    )
