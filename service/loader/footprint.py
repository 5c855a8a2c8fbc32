"""Bytes a loaded model holds, per device, counted from its actual tensors."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def _quant_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """bitsandbytes keeps tensors outside parameters/buffers: 4-bit QuantState, 8-bit SCB."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:
        for attr in ("absmax", "code", "offset"):
            value = getattr(state, attr, None)
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    scb = getattr(weight, "SCB", None)
    if isinstance(scb, torch.Tensor):
        yield scb


def all_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, buffers and bitsandbytes quantization state, with the owner's name."""
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, param
    for name, buf in model.named_buffers(remove_duplicate=False):
        yield name, buf
    for name, module in model.named_modules():
        for tensor in _quant_tensors(module):
            yield name, tensor


def _offload_target(name: str, device_map: dict[str, str]) -> str:
    """Where accelerate put a tensor that sits on `meta` (disk- or cpu-offloaded)."""
    best, target = -1, "disk"
    for prefix, device in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, target = len(prefix), str(device)
    return target


def bytes_by_device(model: nn.Module) -> dict[str, int]:
    """Storage bytes per device; a storage shared by tied weights counts once."""
    device_map = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = {}
    for name, tensor in all_tensors(model):
        if tensor.device.type == "meta":
            device = _offload_target(name, device_map)
            key = (device, id(tensor))
            nbytes = tensor.numel() * tensor.element_size()
        else:
            device = str(tensor.device)
            storage = tensor.untyped_storage()
            key = (device, storage.data_ptr())
            nbytes = storage.nbytes()
        if key in seen:
            continue
        seen.add(key)
        totals[device] = totals.get(device, 0) + nbytes
    return totals


def device_map_of(model: nn.Module) -> dict[str, str]:
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        return {k: _device_name(v) for k, v in mapping.items()}
    first = next(iter(model.parameters()), None)
    return {"": str(first.device) if first is not None else "cpu"}


def _device_name(value: object) -> str:
    return f"cuda:{value}" if isinstance(value, int) else str(value)


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count; a packed 4-bit weight holds two values per byte."""
    total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        packed = getattr(param, "quant_state", None) is not None
        total += param.numel() * 2 if packed else param.numel()
    return total
