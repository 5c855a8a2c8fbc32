"""Validate and normalize device maps and max_memory against the devices this node has."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.common.errors import InvalidSpec
from service.common.load.spec import (
    CUDA_DEVICE,
    CUDA_INDEX,
    CUDA_UUID,
    DEVICE_MAP_STRATEGIES,
    GPU_UUID,
    THIS_GPU,
    DeviceMap,
    MemorySize,
)
from service.common.sizes import parse_size

_PLACEMENT_STRATEGIES = {"auto", "balanced", "balanced_low_0", "sequential"}


def _uuid_key(uuid: str) -> str:
    """NVML writes "GPU-<uuid>", torch's device properties the bare UUID."""
    return uuid.lower().removeprefix("gpu-")


def _uuid_index(uuid: str, uuids: Sequence[str], cuda_count: int, where: str) -> int:
    """The serving process's index of the GPU named `uuid` (`uuids`: its GPUs by index)."""
    keys = [_uuid_key(known) for known in uuids]
    if _uuid_key(uuid) in keys:
        return keys.index(_uuid_key(uuid))
    if uuids:
        seen = ", ".join(f"cuda:{i} = {known}" for i, known in enumerate(uuids))
        have = f"it sees {seen}"
    elif cuda_count:
        have = f"it sees {cuda_count} GPU(s) but not their UUIDs"
    else:
        have = "it sees no GPU"
    raise InvalidSpec(
        f"{where}: there is no GPU {uuid} on this node ({have}). Name a GPU that "
        "`nvidia-smi -L` lists on the service's node, or load where that GPU is."
    )


def _cuda_index(value: str | int, cuda_count: int, where: str, uuids: Sequence[str] = ()) -> int:
    if isinstance(value, int):
        index = value
    elif CUDA_INDEX.match(value):
        index = int(value)
    elif (by_uuid := CUDA_UUID.match(value) or GPU_UUID.match(value)) is not None:
        return _uuid_index(by_uuid.group(by_uuid.lastindex or 0), uuids, cuda_count, where)
    elif value == THIS_GPU:
        raise InvalidSpec(
            f"{where}: {THIS_GPU!r} is resolved by the basehold Client in the worker (to the "
            "GPU its process sees); over HTTP name the GPU: 'cuda:GPU-<uuid>' or 'cuda:N'."
        )
    else:
        match = CUDA_DEVICE.match(value)
        if match is None:
            raise InvalidSpec(
                f"{where}: {value!r} is not a device. Use 'cpu', 'disk', 'cuda:N' or "
                "'cuda:GPU-<uuid>'."
            )
        index = int(match.group(1))
    if index >= cuda_count:
        have = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
        raise InvalidSpec(f"{where}: cuda:{index} does not exist; this node has {have}.")
    return index


def normalize_device_map(
    value: DeviceMap, offload: bool, cuda_count: int, uuids: Sequence[str] = ()
) -> DeviceMap:
    """`uuids`: the node's GPUs by this process's index, to resolve GPUs named by UUID
    (one held model for `cuda:GPU-…` and the `cuda:N` it is)."""
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        return f"cuda:{_cuda_index(value, cuda_count, 'device_map', uuids)}"
    if not value:
        raise InvalidSpec("device_map is an empty object; give module paths or a strategy.")
    normalized: dict[str, str | int] = {}
    for module, device in sorted(value.items()):
        if device in ("cpu", "disk"):
            normalized[module] = str(device)
        else:
            index = _cuda_index(device, cuda_count, f"device_map[{module!r}]", uuids)
            normalized[module] = f"cuda:{index}"
    if "disk" in normalized.values() and not offload:
        raise InvalidSpec("device_map puts modules on 'disk': set `offload: true` to allow it.")
    return normalized


def normalize_max_memory(
    value: dict[str, MemorySize] | None,
    device_map: DeviceMap,
    cuda_count: int,
    uuids: Sequence[str] = (),
) -> dict[str, MemorySize] | None:
    if value is None:
        return None
    if not (isinstance(device_map, str) and device_map in _PLACEMENT_STRATEGIES):
        raise InvalidSpec(
            "max_memory only applies to device_map auto, balanced, balanced_low_0 or sequential."
        )
    normalized: dict[str, MemorySize] = {}
    for key, size in value.items():
        if key in ("cpu", "disk"):
            name = key
        else:
            name = str(_cuda_index(key, cuda_count, "max_memory", uuids))
        try:
            nbytes = parse_size(size)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidSpec(
                f"max_memory[{key!r}] = {size!r} is not a size; use e.g. '20GiB' or bytes."
            ) from exc
        if nbytes < 0:
            raise InvalidSpec(f"max_memory[{key!r}] = {size!r} is negative; give a size.")
        normalized[name] = nbytes
    return dict(sorted(normalized.items()))


def _accelerate_device(value: str | int) -> str | int:
    match = CUDA_DEVICE.match(str(value))
    return int(match.group(1)) if match else value


def accelerate_device_map(value: DeviceMap) -> Any:
    """The form from_pretrained takes: strategies as-is, CUDA devices as indices."""
    if isinstance(value, str):
        return _accelerate_device(value)
    return {module: _accelerate_device(device) for module, device in value.items()}


def accelerate_max_memory(value: dict[str, MemorySize] | None) -> dict[Any, Any] | None:
    if value is None:
        return None
    return {int(k) if CUDA_INDEX.match(k) else k: v for k, v in value.items()}
