"""In the loader: every place a model keeps a shared tensor (parameters, buffers and
bitsandbytes 4-bit state), by arena entry, so that a tensor can be re-pointed to its copy
in the arena or a device segment the moment it is copied, and its source freed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from service.common.handles.descriptor import Quant4Module

Setter = Callable[[torch.Tensor], None]


def _set_parameter(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    param.data = value


def _set_buffer(module: torch.nn.Module, leaf: str, value: torch.Tensor) -> None:
    module._buffers[leaf] = value


def sites(
    model: Any, parameters: dict[str, str], buffers: dict[str, str], quant4: list[Quant4Module]
) -> dict[str, list[Setter]]:
    """Arena entry -> what re-points each place that holds it (tied names share an entry)."""
    modules = dict(model.named_modules())
    found: dict[str, list[Setter]] = {}
    for name, entry in parameters.items():
        owner, _, leaf = name.rpartition(".")
        param = modules[owner]._parameters[leaf]
        assert param is not None
        found.setdefault(entry, []).append(functools.partial(_set_parameter, param))
    for name, entry in buffers.items():
        owner, _, leaf = name.rpartition(".")
        found.setdefault(entry, []).append(functools.partial(_set_buffer, modules[owner], leaf))
    for quant in quant4:
        state = modules[quant.module].weight.quant_state
        held = [(quant.state.absmax, state, "absmax"), (quant.state.code, state, "code")]
        if quant.state.offset is not None:
            held += [
                (quant.state.offset, state, "offset"),
                (quant.state.nested_absmax or "", state.state2, "absmax"),
                (quant.state.nested_code or "", state.state2, "code"),
            ]
        for entry, owner_state, attr in held:
            found.setdefault(entry, []).append(functools.partial(setattr, owner_state, attr))
    return found


def bind(found: dict[str, list[Setter]], entry: str, value: torch.Tensor) -> None:
    """Re-point every place holding `entry` to `value` (the old tensor is freed once nothing
    else holds it)."""
    for setter in found.get(entry, []):
        setter(value)
