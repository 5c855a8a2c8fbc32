"""A stand-in for CUDA device segments on machines without a GPU.

It claims CPU tensors, so a whole model goes through the device-segment path (layout,
copy, rebind, descriptor, worker build); segments are host allocations and "IPC" is a
lookup in this process. Only the IPC calls themselves are left to bench/gpu_check.py.
"""

from __future__ import annotations

import uuid
import weakref

import torch

from service.handles.descriptor import CudaIpc, DeviceSegment


class HostSegments:
    def __init__(self) -> None:
        self.published: weakref.WeakValueDictionary[str, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )
        self.emptied = 0

    def claims(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    def publish(self, name: str, segment: torch.Tensor) -> DeviceSegment:
        key = uuid.uuid4().hex
        self.published[key] = segment
        return DeviceSegment(
            name=name,
            device=name,
            device_uuid="GPU-host-stand-in",
            size=segment.numel(),
            ipc=CudaIpc(
                handle=key,
                storage_size_bytes=segment.numel(),
                storage_offset_bytes=0,
                ref_counter="",
                ref_counter_offset=0,
                event_handle="",
                event_sync_required=False,
            ),
        )

    def open(self, segment: DeviceSegment) -> torch.Tensor:
        return self.published[segment.ipc.handle]

    def empty_cache(self) -> None:
        self.emptied += 1
