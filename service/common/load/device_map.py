"""Validate and normalize device maps and max_memory against the devices this node has."""

from __future__ import annotations

from typing import Any

from service.common.errors import InvalidSpec
from service.common.load.spec import (
    CUDA_DEVICE,
    CUDA_INDEX,
    DEVICE_MAP_STRATEGIES,
    DeviceMap,
    MemorySize,
)
from service.common.sizes import parse_size

_PLACEMENT_STRATEGIES = {"auto", "balanced", "balanced_low_0", "sequential"}


def _cuda_index(value: str | int, cuda_count: int, where: str) -> int:
    if isinstance(value, int):
        index = value
    elif CUDA_INDEX.match(value):
        index = int(value)
    else:
        match = CUDA_DEVICE.match(value)
        if match is None:
            raise InvalidSpec(f"{where}: {value!r} is not a device. Use 'cpu', 'disk' or 'cuda:N'.")
        index = int(match.group(1))
    if index >= cuda_count:
        have = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
        raise InvalidSpec(f"{where}: cuda:{index} does not exist; this node has {have}.")
    return index


def normalize_device_map(value: DeviceMap, offload: bool, cuda_count: int) -> DeviceMap:
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        return f"cuda:{_cuda_index(value, cuda_count, 'device_map')}"
    if not value:
        raise InvalidSpec("device_map is an empty object; give module paths or a strategy.")
    normalized: dict[str, str | int] = {}
    for module, device in sorted(value.items()):
        if device in ("cpu", "disk"):
            normalized[module] = str(device)
        else:
            index = _cuda_index(device, cuda_count, f"device_map[{module!r}]")
            normalized[module] = f"cuda:{index}"
    if "disk" in normalized.values() and not offload:
        raise InvalidSpec("device_map puts modules on 'disk': set `offload: true` to allow it.")
    return normalized


def normalize_max_memory(
    value: dict[str, MemorySize] | None, device_map: DeviceMap, cuda_count: int
) -> dict[str, MemorySize] | None:
    if value is None:
        return None
    if not (isinstance(device_map, str) and device_map in _PLACEMENT_STRATEGIES):
        raise InvalidSpec(
            "max_memory only applies to device_map auto, balanced, balanced_low_0 or sequential."
        )
    normalized: dict[str, MemorySize] = {}
    for key, size in value.items():
        name = key if key in ("cpu", "disk") else str(_cuda_index(key, cuda_count, "max_memory"))
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
