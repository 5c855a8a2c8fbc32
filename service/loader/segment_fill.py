"""In the loader: move a model's device tensors into device segments, never holding a
second copy of the model (see `service.loader.segment_chunks` for the cut and the peak).

Each tensor is copied into its segment and the model re-pointed to the copy at once, so its
source is freed as it goes; before the next segment is allocated torch's cache gives the
freed sources back to the driver (`empty_cache`). torch can only give back a cached block
that is wholly free: transformers' `caching_allocator_warmup` makes one allocation for the
whole model, which returns nothing until every tensor in it is freed (unless the loader runs
with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, whose free pages return one by
one). Where the cache keeps what was freed, the tensors not yet moved are first moved to
host memory, which frees that allocation whole; they are copied to their segments from
there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from service.common.handles.arena import plan_entries, segment_view
from service.common.handles.descriptor import ArenaEntry, DeviceSegment
from service.common.handles.devices import DEVICE_ALIGN, DeviceSegments
from service.loader import segment_chunks
from service.loader.shareable import NotShareableModel

# The cache keeping back more than this (and more than half of what was moved) is worth
# the detour through host memory; below it, a few MiB more at the peak are not.
SPILL_FLOOR = 64 * 2**20

Bind = Callable[[str, torch.Tensor], None]
Cached = Callable[[torch.device], int]


def allocator_cached(device: torch.device) -> int:
    """Bytes torch's CUDA cache keeps on `device` without a tensor in them (after
    `empty_cache`: what it cannot give back to the driver)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


@dataclass
class Filled:
    entries: list[ArenaEntry] = field(default_factory=list)
    described: list[DeviceSegment] = field(default_factory=list)
    segments: list[torch.Tensor] = field(default_factory=list)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def fill(
    claimed: dict[str, torch.Tensor],
    devices: DeviceSegments,
    fds: list[int],
    bind: Bind,
    cached: Cached | None = None,
) -> Filled:
    """Move every tensor of `claimed` (emptied as they move: it must hold the only
    reference besides the model's) into segments, re-point the model through `bind`, and
    publish each segment (its fd is appended to `fds`, which the caller owns, also when
    this raises). NotShareableModel says why a segment could not be made or exported; the
    model then still works on its device, partly in segments this process alone maps.
    `cached`: what torch's cache keeps on a device (default: `allocator_cached`)."""
    cached = cached or allocator_cached
    filled = Filled()
    by_device: dict[str, list[str]] = {}
    for name, device in [(n, str(t.device)) for n, t in claimed.items()]:
        by_device.setdefault(device, []).append(name)  # (no loop variable keeps a source)
    for device, names in by_device.items():
        _fill_device(device, names, claimed, devices, fds, bind, cached, filled)
    return filled


def _fill_device(
    device: str,
    names: list[str],
    claimed: dict[str, torch.Tensor],
    devices: DeviceSegments,
    fds: list[int],
    bind: Bind,
    cached: Cached,
    filled: Filled,
) -> None:
    target = torch.device(device)
    sizes = [(n, _nbytes(claimed[n])) for n in names]
    model_bytes = sum(s for _, s in sizes)
    chunks = segment_chunks.cut(sizes, DEVICE_ALIGN)
    spilled: list[str] = []
    if len(chunks) > 1:
        devices.empty_cache()  # what loading left cached goes back before the first segment
    baseline, moved = cached(target), 0
    try:
        for index, chunk in enumerate(chunks):
            name = device if len(chunks) == 1 else f"{device}/{index}"
            if index:
                devices.empty_cache()  # the sources moved so far go back to the driver
                kept = cached(target) - baseline
                if not spilled and kept > max(moved // 2, min(SPILL_FLOOR, model_bytes // 8)):
                    spilled = _spill([n for rest in chunks[index:] for n in rest], claimed, bind)
                    devices.empty_cache()
            planned = plan_entries(
                ((n, claimed[n]) for n in chunk), align=DEVICE_ALIGN, segment=name
            )
            size = max((e.offset + e.nbytes for e in planned), default=0)
            segment = _allocate(devices, target, size)
            for entry in planned:
                view = segment_view(segment, entry)
                view.copy_(claimed.pop(entry.name))
                bind(entry.name, view)  # the source is freed here
            moved += size
            described, fd = _publish(devices, name, segment, len(fds) + 1)
            fds.append(fd)
            filled.described.append(described)
            filled.entries.extend(planned)
            filled.segments.append(segment)
    except NotShareableModel:
        # The model is held privately: what was spilled to the host goes back to its device.
        for n in spilled:
            if n in claimed:
                bind(n, claimed[n].to(target))
        raise


def _spill(names: list[str], claimed: dict[str, torch.Tensor], bind: Bind) -> list[str]:
    """Copy the tensors not yet moved to host memory and free them on the device (when the
    host has room for them): torch's cache can then give their allocation back whole."""
    needed = sum(_nbytes(claimed[n]) for n in names)
    if needed * 1.1 > psutil.virtual_memory().available:
        return []
    for n in names:
        host = claimed[n].to("cpu", copy=True)
        claimed[n] = host
        bind(n, host)
    return names


def _allocate(devices: DeviceSegments, device: torch.device, size: int) -> torch.Tensor:
    try:
        return devices.allocate(device, size)
    except torch.OutOfMemoryError as exc:
        raise NotShareableModel(
            f"{device} had no room for the shareable copy (a {size / 2**30:.2f} GiB segment "
            f"while placing: {exc}); free memory on it and load again to lend the model"
        ) from exc
    except RuntimeError as exc:  # the driver refused (service.common.handles.vmm.VmmUnavailable)
        raise NotShareableModel(
            f"a device segment could not be made on {device} ({exc}); the model is held privately"
        ) from exc


def _publish(
    devices: DeviceSegments, name: str, segment: torch.Tensor, fd_index: int
) -> tuple[DeviceSegment, int]:
    try:
        return devices.publish(name, segment, fd_index)
    except (RuntimeError, OSError) as exc:  # VmmUnavailable: cuMemExportToShareableHandle
        raise NotShareableModel(
            f"the device segment {name} could not be exported for workers ({exc}); the model "
            "is held privately"
        ) from exc
