"""Device segments: one allocation per GPU holding a held model's tensors on that GPU,
opened by workers through CUDA IPC.

This is the narrow seam to CUDA for handles. `CudaSegments` asks torch: the service
allocates the segment, copies the model's tensors into it and exports the allocation with
`UntypedStorage._share_cuda_()` (the same call `torch.multiprocessing` uses, but the result
travels as JSON, never pickled); a worker opens it with `rebuild_cuda_tensor`. Tests on
machines without a GPU stand in a host-memory fake behind the same protocol.

Lifetime: torch counts consumers in a shared ref-counter file and parks a freed block in
"limbo" until the count drops; a worker killed with SIGKILL would never drop it, pinning
the block forever. basehold owns the lifetime with leases instead, so the service returns
torch's count at once and keeps the segment referenced while a lease (or a revoked lease's
remaining TTL) may still use it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Protocol

import torch

from service.handles.descriptor import CudaIpc, DeviceSegment
from service.memory.cuda import TorchCuda

# Segment entries start on this boundary: what the CUDA caching allocator gives a fresh
# tensor, so vectorised kernels see the alignment they expect.
DEVICE_ALIGN = 512


class SegmentUnavailable(RuntimeError):
    """The worker cannot open a device segment (no GPU, another GPU, no IPC)."""


class DeviceSegments(Protocol):
    # What the handle's `ipc` fields mean; a worker refuses a handle in another format.
    ipc_format: str

    def unavailable(self) -> str | None:
        """Why segments cannot be published in this process (None: they can)."""
        ...

    def claims(self, device: torch.device) -> bool:
        """Whether tensors on `device` go into a device segment (else: the arena file)."""
        ...

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor: ...

    def publish(self, name: str, segment: torch.Tensor) -> DeviceSegment:
        """Make the filled segment visible to other processes and describe it."""
        ...

    def open(self, segment: DeviceSegment) -> torch.Tensor:
        """Worker side: the segment as a flat uint8 tensor on this process's device."""
        ...

    def empty_cache(self) -> None: ...


def _b64(raw: bytes | None) -> str:
    return base64.b64encode(raw or b"").decode()


def _torch_uuids() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def expandable_segments() -> bool:
    """Whether the CUDA caching allocator is configured with expandable segments (its
    blocks are exported differently; basehold does not lend from them)."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        for option in os.environ.get(name, "").split(","):
            key, _, value = option.partition(":")
            if key.strip() == "expandable_segments" and value.strip().lower() == "true":
                return True
    return False


class CudaSegments:
    # The 8 fields of torch's UntypedStorage._share_cuda_() (torch >= 2.0).
    ipc_format = "torch-share-cuda/8"

    def __init__(self, visible_uuids: Callable[[], list[str]] = _torch_uuids) -> None:
        self._visible_uuids = visible_uuids

    def unavailable(self) -> str | None:
        if expandable_segments():
            return (
                "PYTORCH_CUDA_ALLOC_CONF enables expandable_segments, whose memory basehold "
                "does not export over CUDA IPC; start the service without it to lend GPU models"
            )
        return None

    def claims(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    def publish(self, name: str, segment: torch.Tensor) -> DeviceSegment:
        device = segment.device
        # Every copy into the segment must have landed before another process reads it.
        torch.cuda.synchronize(device)
        shared = segment.untyped_storage()._share_cuda_()
        _, handle, size_bytes, offset_bytes, ref_counter, ref_offset, event, sync = shared
        # Hand torch's consumer count back at once: leases decide when the block is freed.
        torch.UntypedStorage._release_ipc_counter_cuda(ref_counter, ref_offset)
        return DeviceSegment(
            name=name,
            device=str(device),
            device_uuid=str(torch.cuda.get_device_properties(device).uuid),
            size=segment.numel(),
            ipc=CudaIpc(
                handle=_b64(handle),
                storage_size_bytes=int(size_bytes),
                storage_offset_bytes=int(offset_bytes),
                ref_counter=_b64(ref_counter),
                ref_counter_offset=int(ref_offset),
                event_handle=_b64(event),
                event_sync_required=bool(sync),
            ),
        )

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

    def open(self, segment: DeviceSegment) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        index = self.local_index(segment)
        ipc = segment.ipc
        tensor: torch.Tensor = rebuild_cuda_tensor(
            torch.Tensor,
            (segment.size,),
            (1,),
            0,
            torch.UntypedStorage,
            torch.uint8,
            index,
            base64.b64decode(ipc.handle),
            ipc.storage_size_bytes,
            ipc.storage_offset_bytes,
            False,
            base64.b64decode(ipc.ref_counter),
            ipc.ref_counter_offset,
            base64.b64decode(ipc.event_handle),
            ipc.event_sync_required,
        )
        return tensor

    def empty_cache(self) -> None:
        TorchCuda().empty_cache()


CUDA = CudaSegments()
