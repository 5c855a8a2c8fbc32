"""A stand-in for CUDA device segments on machines without a GPU, behind the same seam
(`service.handles.devices.DeviceSegments`).

It claims CPU tensors, so a whole model goes through the device-segment path (layout,
copy, rebind, descriptor, worker build, lifetime, the forward guard). A segment is a memfd
in shared host memory; its "IPC handle" is `/proc/<pid>/fd/<n>`, which another process of
the same user opens, as CUDA IPC opens a device allocation. Like a CUDA IPC mapping it is
writable, and it disappears when the service frees the segment (its fd is closed once the
segment tensor is gone). Only the CUDA calls themselves are left to a real GPU
(bench/gpu_check.py on a device).
"""

from __future__ import annotations

import mmap
import os
import warnings
import weakref

import torch

from service.handles.descriptor import CudaIpc, DeviceSegment
from service.handles.devices import SegmentUnavailable

STAND_IN_UUID = "GPU-host-stand-in"

STAND_IN_FD = "stand_in_fd"  # the memfd behind a stand-in segment, kept on the tensor


def _tensor_over(mapping: mmap.mmap) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapping, dtype=torch.uint8)


class HostSegments:
    ipc_format = "host-stand-in/memfd"

    def __init__(self) -> None:
        self.emptied = 0

    def unavailable(self) -> str | None:
        return None

    def claims(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        fd = os.memfd_create("basehold-segment", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            segment = _tensor_over(mmap.mmap(fd, 0, mmap.MAP_SHARED))
        except BaseException:
            os.close(fd)
            raise
        # The segment is "freed" (no longer openable) when the service drops it.
        weakref.finalize(segment, os.close, fd)
        setattr(segment, STAND_IN_FD, fd)
        return segment

    def publish(self, name: str, segment: torch.Tensor) -> DeviceSegment:
        fd: int = getattr(segment, STAND_IN_FD)
        return DeviceSegment(
            name=name,
            device=name,
            device_uuid=STAND_IN_UUID,
            size=segment.numel(),
            ipc=CudaIpc(
                handle=f"/proc/{os.getpid()}/fd/{fd}",
                storage_size_bytes=segment.numel(),
                storage_offset_bytes=0,
                ref_counter="",
                ref_counter_offset=0,
                event_handle="",
                event_sync_required=False,
            ),
        )

    def open(self, segment: DeviceSegment) -> torch.Tensor:
        try:
            fd = os.open(segment.ipc.handle, os.O_RDWR)
        except OSError as exc:
            raise SegmentUnavailable(
                f"the stand-in segment {segment.ipc.handle} is gone: the service freed it"
            ) from exc
        try:
            return _tensor_over(mmap.mmap(fd, 0, mmap.MAP_SHARED))[: segment.size]
        finally:
            os.close(fd)

    def empty_cache(self) -> None:
        self.emptied += 1
