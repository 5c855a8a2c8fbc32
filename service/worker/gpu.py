"""Worker side: the GPU this process sees, so that a job the scheduler put on some GPU asks
for its base on that same GPU (`device_map: "this-gpu"` in `Client.ensure` / `attach(spec=…)`
becomes `cuda:<UUID>`; the service resolves the UUID to its own index), and a clear error
when a model's segments are on a GPU this process does not see.

UUIDs, not indices: the scheduler's CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES renumber
GPUs in each container, so index 0 in the worker is rarely index 0 in the service."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service.common.load.spec import THIS_GPU


class GpuNotFound(RuntimeError):
    """This process sees no GPU, or not the one a model is on."""


@dataclass(frozen=True)
class VisibleGpus:
    """The GPUs this process sees, by its own index, as NVML writes them ("GPU-…"), and the
    one it computes on (torch's current device)."""

    uuids: tuple[str, ...]
    current: int = 0


def torch_gpus() -> VisibleGpus:
    """The seam to the hardware: torch's view (it follows CUDA_VISIBLE_DEVICES)."""
    import torch

    if not torch.cuda.is_available():
        return VisibleGpus(())
    count = torch.cuda.device_count()
    uuids = tuple(_nvml_form(str(torch.cuda.get_device_properties(i).uuid)) for i in range(count))
    return VisibleGpus(uuids, int(torch.cuda.current_device()))


def _nvml_form(uuid: str) -> str:
    """torch writes the bare UUID; NVML, `nvidia-smi -L` and the service "GPU-<uuid>"."""
    return uuid if uuid.upper().startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def _key(uuid: str) -> str:
    return uuid.lower().removeprefix("gpu-")


def _settings() -> str:
    names = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
    return ", ".join(f"{name}={os.environ.get(name, '<unset>')}" for name in names)


def this_gpu(gpus: Callable[[], VisibleGpus] = torch_gpus) -> str:
    """The UUID of the GPU this process computes on."""
    seen = gpus()
    if not seen.uuids:
        raise GpuNotFound(
            f"device_map {THIS_GPU!r} asks for the GPU this process sees, and it sees none "
            f"({_settings()}). Give the pod a GPU through the scheduler (resources: limits: "
            "nvidia.com/gpu: 1), or name the device: 'cuda:GPU-<uuid>' or 'cuda:N'."
        )
    return seen.uuids[seen.current]


def resolve(
    request: Mapping[str, Any], gpus: Callable[[], VisibleGpus] = torch_gpus
) -> dict[str, Any]:
    """`request` (a LoadRequest dict) with every "this-gpu" (device_map, its values,
    max_memory's keys) replaced by `cuda:<UUID>` of this process's GPU. The hardware is
    asked only when the request names it."""
    resolved = dict(request)
    device_map = resolved.get("device_map")
    memory = resolved.get("max_memory")
    named = device_map == THIS_GPU
    named |= isinstance(device_map, dict) and THIS_GPU in device_map.values()
    named |= isinstance(memory, dict) and THIS_GPU in memory
    if not named:
        return resolved
    device = f"cuda:{this_gpu(gpus)}"
    if device_map == THIS_GPU:
        resolved["device_map"] = device
    elif isinstance(device_map, dict):
        resolved["device_map"] = {k: device if v == THIS_GPU else v for k, v in device_map.items()}
    if isinstance(memory, dict):
        resolved["max_memory"] = {device if k == THIS_GPU else k: v for k, v in memory.items()}
    return resolved


def check_segments(handle: Mapping[str, Any], seen: VisibleGpus) -> None:
    """Raise, naming both GPUs, when a segment of `handle` (a lease's handle) lies on a GPU
    this process does not see: the worker was scheduled onto another GPU than its base."""
    visible = {_key(uuid) for uuid in seen.uuids}
    for segment in handle.get("segments") or ():
        uuid = str(segment.get("device_uuid", ""))
        if _key(uuid) in visible:
            continue
        ours = (
            f"GPU {seen.uuids[seen.current]}"
            + (f" (and {len(seen.uuids) - 1} more)" if len(seen.uuids) > 1 else "")
            if seen.uuids
            else "no GPU"
        )
        raise GpuNotFound(
            f"the model's weights are on GPU {_nvml_form(uuid)} ({segment.get('device')} in "
            f"the service), but this process sees {ours} ({_settings()}). Load the base "
            f"with device_map {THIS_GPU!r} (Client.ensure / attach(spec=…)) so it lands on "
            "this job's GPU, or schedule the job onto the GPU that holds it."
        )
