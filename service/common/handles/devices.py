"""Device segments: allocations on a GPU holding a held model's tensors there (several per
GPU, filled one after another: `service.loader.segment_fill`), each lent to workers as a
file descriptor.

This is the narrow seam to CUDA for handles. `CudaSegments` makes each segment a CUDA VMM
allocation exported as a POSIX fd (`service.common.handles.vmm`, through cuda-bindings): the
loader allocates it, copies the model's tensors in and exports the fd; the service keeps
the fd (the memory lives while any fd or mapping of it does, not with the loader); a
worker imports it on its own index of the same GPU and wraps it as a tensor, zero-copy,
in any PID namespace. Tests on machines without a GPU stand in a memfd behind the same
protocol (tests/common/handles/host_segments.py): the same fds travel the same way.

Lifetime: the service closes its fd when the model is unloaded, or, when revoked leases
may still be reading it, once their TTL (or the grace after a release) has run out; a
worker's mapping keeps the memory valid until it unmaps.

Workers map segments read-only where the driver allows (`open(..., read_only=True)`), and
attach binds the base's tensors as copy-on-write parameters
(`service.worker.copy_on_write`), so a merge writes into the worker's own copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch

from service.common.handles.descriptor import DeviceSegment
from service.common.torch_cuda import TorchCuda

# Segment entries start on this boundary: what the CUDA caching allocator gives a fresh
# tensor, so vectorised kernels see the alignment they expect.
DEVICE_ALIGN = 512

log = logging.getLogger("basehold.segments")


class SegmentUnavailable(RuntimeError):
    """The worker cannot open a device segment (no GPU, another GPU, no driver)."""


class DeviceSegments(Protocol):
    # What the segments' fds are; a worker refuses a handle in another format.
    ipc_format: str

    def unavailable(self) -> str | None:
        """Why segments cannot be made in this process (None: they can)."""
        ...

    def claims(self, device: torch.device) -> bool:
        """Whether tensors on `device` go into a device segment (else: the arena file)."""
        ...

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        """A flat uint8 tensor of at least `nbytes` over exportable memory."""
        ...

    def publish(self, name: str, segment: torch.Tensor, fd_index: int) -> tuple[DeviceSegment, int]:
        """Once every copy into `segment` landed: its description and a new fd of it (the
        caller owns the fd)."""
        ...

    def open(self, segment: DeviceSegment, fd: int, read_only: bool = True) -> torch.Tensor:
        """Worker side: the segment behind `fd` as a flat uint8 tensor on this process's
        device (the caller keeps `fd`; the tensor keeps the memory), mapped read-only where
        possible; `mapped_read_only(tensor)` says whether it is."""
        ...

    def empty_cache(self) -> None: ...


READ_ONLY = "basehold_read_only"  # set by `open` on the tensor it returns


def mapped_read_only(opened: torch.Tensor) -> bool:
    """Whether a segment tensor from `DeviceSegments.open` is a read-only mapping (a
    write through it faults) rather than a read-write one (a write would change the
    service's base for every worker)."""
    return bool(getattr(opened, READ_ONLY, False))


def _torch_uuids() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


class CudaSegments:
    ipc_format = "cuda-vmm-posix-fd/1"

    def __init__(self, visible_uuids: Callable[[], list[str]] = _torch_uuids) -> None:
        self._visible_uuids = visible_uuids
        self._mappings: dict[int, object] = {}  # segment data_ptr -> its vmm.Mapping

    def unavailable(self) -> str | None:
        try:
            import cuda.bindings.driver  # noqa: F401
        except ImportError:
            return (
                "cuda-bindings is not installed in the service; `pip install cuda-bindings` "
                "to lend GPU models (they are lent as CUDA VMM file descriptors)"
            )
        return None

    def claims(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        from service.common.handles import vmm

        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            mapping = vmm.create(index, max(nbytes, 1))
        except vmm.VmmUnavailable as exc:
            raise torch.OutOfMemoryError(str(exc)) from exc
        segment = mapping.tensor()
        self._mappings[segment.data_ptr()] = mapping
        return segment

    def publish(self, name: str, segment: torch.Tensor, fd_index: int) -> tuple[DeviceSegment, int]:
        from service.common.handles import vmm

        device = segment.device
        torch.cuda.synchronize(device)  # every copy has landed before anyone maps it
        mapping = self._mappings.pop(segment.data_ptr())
        assert isinstance(mapping, vmm.Mapping)
        described = DeviceSegment(
            name=name,
            device=str(device),
            device_uuid=str(torch.cuda.get_device_properties(device).uuid),
            size=mapping.size,
            fd_index=fd_index,
        )
        return described, mapping.export()

    def local_index(self, segment: DeviceSegment) -> int:
        """The worker's index of the service's GPU: CUDA_VISIBLE_DEVICES may differ."""
        uuids = self._visible_uuids()
        if segment.device_uuid in uuids:
            return uuids.index(segment.device_uuid)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise SegmentUnavailable(
            f"the model's weights are on GPU {segment.device_uuid} ({segment.device} in the "
            f"service), which this process cannot see (CUDA_VISIBLE_DEVICES={visible}, "
            f"{len(uuids)} GPU(s) visible). Run the worker on the same node with that GPU visible."
        )

    def open(self, segment: DeviceSegment, fd: int, read_only: bool = True) -> torch.Tensor:
        from service.common.handles import vmm

        index = self.local_index(segment)
        try:
            mapping = vmm.import_fd(fd, index, segment.size, read_only=read_only)
        except vmm.VmmUnavailable as exc:
            raise SegmentUnavailable(f"the segment {segment.name} cannot be mapped: {exc}") from exc
        if read_only and not mapping.read_only:
            log.warning(
                "the driver refused a read-only mapping of %s (%s): mapped read-write; "
                "the worker's copy-on-write parameters still keep merges off it",
                segment.name,
                mapping.read_only_refused,
            )
        opened = mapping.tensor()
        setattr(opened, READ_ONLY, mapping.read_only)
        return opened

    def empty_cache(self) -> None:
        TorchCuda().empty_cache()


CUDA = CudaSegments()
