"""A stand-in for CUDA device segments on machines without a GPU, behind the same seam
(`service.common.handles.devices.DeviceSegments`).

It claims CPU tensors, so a whole model goes through the device-segment path (layout,
copy, rebind, descriptor, the fds the loader hands the service and the service hands
workers, worker build, lifetime, the forward guard). A segment is a memfd in shared host
memory, lent as its fd exactly as a CUDA VMM allocation is lent as its exported POSIX fd;
like a VMM allocation it lives while any fd or mapping of it does, the loader maps it
read-write and a worker read-only (PROT_READ, as the worker's CU_MEM_ACCESS_FLAGS_PROT_READ
mapping on a GPU): a write that reaches it kills the worker with SIGSEGV, as it would
fault a GPU worker's CUDA context. Only the CUDA calls themselves are left to a real GPU
(bench/gpu_check.py on a device).
"""

from __future__ import annotations

import mmap
import os
import warnings
import weakref

import torch

from service.common.handles.descriptor import DeviceSegment
from service.common.handles.devices import READ_ONLY, SegmentUnavailable

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
        # This process's own reference goes with the segment tensor.
        weakref.finalize(segment, os.close, fd)
        setattr(segment, STAND_IN_FD, fd)
        return segment

    def publish(self, name: str, segment: torch.Tensor, fd_index: int) -> tuple[DeviceSegment, int]:
        fd: int = getattr(segment, STAND_IN_FD)
        described = DeviceSegment(
            name=name,
            device=name,
            device_uuid=STAND_IN_UUID,
            size=segment.numel(),
            fd_index=fd_index,
        )
        return described, os.dup(fd)

    def open(self, segment: DeviceSegment, fd: int, read_only: bool = True) -> torch.Tensor:
        protection = mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            mapping = mmap.mmap(fd, segment.size, mmap.MAP_SHARED, protection)
        except (OSError, ValueError) as exc:
            raise SegmentUnavailable(
                f"the stand-in segment {segment.name} cannot be mapped: {exc}"
            ) from exc
        opened = _tensor_over(mapping)
        setattr(opened, READ_ONLY, read_only)
        return opened

    def empty_cache(self) -> None:
        self.emptied += 1
