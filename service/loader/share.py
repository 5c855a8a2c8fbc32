"""In the loader process: put a loaded model's tensors into an arena and re-point the model
to it. The handle it builds names the worker socket and its uid as the job says; the
serving process puts its own in when it receives the manifest (a loader never chooses
where workers send a lease's secret)."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from service.common.handles import bindings
from service.common.handles.arena import DTYPE_CODES, Arena, stream_arena
from service.common.handles.descriptor import (
    ArenaInfo,
    Handle,
    Provenance,
    Quant4Module,
    Quant4State,
)
from service.common.handles.devices import CUDA, DeviceSegments
from service.common.handles.repack import disable_cpu_repack
from service.loader import rebind, segment_fill
from service.loader.ahead import Ahead
from service.loader.shareable import NotShareableModel

__all__ = ["NotShareableModel", "Shared", "share"]

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class _Plan:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    by_identity: dict[tuple[int, int, str, tuple[int, ...]], str] = field(default_factory=dict)

    def entry(self, name: str, tensor: torch.Tensor) -> str:
        key = (
            tensor.data_ptr(),
            tensor.untyped_storage().data_ptr(),
            str(tensor.dtype),
            tuple(tensor.shape),
        )
        if key not in self.by_identity:
            self.by_identity[key] = name
            self.tensors[name] = tensor
        return self.by_identity[key]


def _check(model: Any, devices: DeviceSegments) -> None:
    if getattr(model.config, "auto_map", None):
        raise NotShareableModel("checkpoints with remote code cannot be attached by workers")
    seen: set[torch.device] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta":
            raise NotShareableModel(f"{name} is offloaded (disk/cpu hooks); load without offload")
        if tensor.device.type != "cpu" and not devices.claims(tensor.device):
            raise NotShareableModel(f"{name} is on {tensor.device}, which cannot be shared")
        if tensor.dtype not in DTYPE_CODES:
            raise NotShareableModel(
                f"{name} is {str(tensor.dtype).removeprefix('torch.')}, which the arena format "
                "cannot describe; the model is held privately"
            )
        seen.add(tensor.device)
    if len(seen) > 1:
        # The worker would need accelerate's dispatch hooks to move activations between
        # devices; until that is built, workers attach models that live on one device.
        raise NotShareableModel(
            f"the model is split across {', '.join(sorted(map(str, seen)))}; load it with "
            'device_map "cuda:N" or "cpu" to lend it to workers'
        )
    if any(devices.claims(d) for d in seen) and (reason := devices.unavailable()) is not None:
        raise NotShareableModel(reason)
    # cuda-bindings of a newer CUDA major than the driver's fail inside the VMM calls: say
    # which package to install before any segment is made.
    if any(d.type == "cuda" and devices.claims(d) for d in seen) and (
        reason := bindings.mismatch()
    ):
        raise NotShareableModel(reason)
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            raise NotShareableModel(
                f"{name} is bitsandbytes 8-bit, whose state cannot be shared exactly; use 4-bit"
            )


def _quant4(plan: _Plan, name: str, module: Any) -> Quant4Module:
    weight = module.weight
    state = weight.quant_state
    nested = state.state2 if getattr(state, "nested", False) else None
    return Quant4Module(
        module=name,
        in_features=module.in_features,
        out_features=module.out_features,
        bias=module.bias is not None,
        compute_dtype=DTYPE_NAMES.get(module.compute_dtype) if module.compute_dtype else None,
        quant_storage=str(weight.quant_storage).removeprefix("torch."),
        compress_statistics=bool(weight.compress_statistics),
        state=Quant4State(
            absmax=plan.entry(f"{name}.weight.absmax", state.absmax),
            code=plan.entry(f"{name}.weight.quant_map", state.code),
            shape=list(state.shape),
            dtype=str(state.dtype).removeprefix("torch."),
            blocksize=int(state.blocksize),
            quant_type=state.quant_type,
            offset=plan.entry(f"{name}.weight.offset", state.offset) if nested else None,
            nested_absmax=plan.entry(f"{name}.weight.nested_absmax", nested.absmax)
            if nested
            else None,
            nested_code=plan.entry(f"{name}.weight.nested_quant_map", nested.code)
            if nested
            else None,
            nested_blocksize=int(nested.blocksize) if nested else None,
            nested_dtype=str(nested.dtype).removeprefix("torch.") if nested else None,
        ),
    )


@dataclass
class Shared:
    """A model placed in an arena: the handle, and what keeps the memory alive in the loader
    (the arena's fd and one fd per device segment, which the serving process and workers
    get copies of, and the loader's own mappings)."""

    handle: Handle
    arena: Arena
    mapping: mmap.mmap
    segments: list[torch.Tensor] = field(default_factory=list)
    segment_fds: list[int] = field(default_factory=list)

    @property
    def fd(self) -> int:
        return self.arena.fd

    @property
    def fds(self) -> list[int]:
        """The arena's fd, then the segments' in `DeviceSegment.fd_index` order."""
        return [self.arena.fd, *self.segment_fds]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _public_config(model: Any) -> dict[str, Any]:
    """The config for workers, without the server-local path it was loaded from."""
    config: dict[str, Any] = model.config.to_dict()
    config.pop("_name_or_path", None)
    return config


def _generation_config(model: Any) -> dict[str, Any] | None:
    generation = getattr(model, "generation_config", None)
    if generation is None or not getattr(model, "can_generate", lambda: False)():
        return None
    described: dict[str, Any] = generation.to_dict()
    return described


def share(
    model: Any,
    model_id: str,
    socket: str,
    devices: DeviceSegments = CUDA,
    name: str | None = None,
    provenance: Provenance | None = None,
    prefetch: Ahead | None = None,
) -> Shared:
    """Write the arena (host tensors) and device segments (GPU tensors), re-point `model`
    to them, and describe both for workers, who fetch the arena from `socket`. `name`
    names the memfd (default: the model id). `prefetch`: the arena written while the model
    loaded (`service.loader.ahead`: the checkpoint's bytes copied, or the casts written into
    it), made the arena where the model holds those bytes. The caller owns `Shared.fd` (and
    still closes `prefetch`)."""
    _check(model, devices)
    plan = _Plan()
    parameters = {n: plan.entry(n, p) for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: plan.entry(n, b) for n, b in model.named_buffers(remove_duplicate=False)}
    quant4 = [
        _quant4(plan, n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"
    ]
    sites = rebind.sites(model, parameters, buffers, quant4)
    # The plan must not keep the device tensors alive: each is freed as it is moved.
    claimed = {
        n: plan.tensors.pop(n) for n in list(plan.tensors) if devices.claims(plan.tensors[n].device)
    }

    # Host tensors leave the plan as they are written; each is re-pointed to the arena at
    # once, so its private copy goes then (the load's peak: the arena plus one tensor).
    def placed(entry: str, view: torch.Tensor) -> None:
        rebind.bind(sites, entry, view)

    direct = prefetch.adopt(plan.tensors, placed) if prefetch is not None and not claimed else None
    if direct is None:
        if prefetch is not None:
            prefetch.close()  # its memory goes before the arena is written again
        direct = stream_arena(name or model_id, plan.tensors, placed)
    arena, mapping = direct
    # From here the arena's and segments' fds are ours until `Shared` hands them to the
    # caller: every error path closes them (a leaked memfd holds a whole model of memory).
    segment_fds: list[int] = []
    try:
        filled = segment_fill.fill(claimed, devices, segment_fds, placed)
        handle = Handle(
            model_id=model_id,
            arena=ArenaInfo(
                socket=socket, name=arena.name, size=arena.size, data_start=arena.data_start
            ),
            socket_uid=os.getuid(),
            segments=filled.described,
            entries=[*arena.entries, *filled.entries],
            parameters=parameters,
            buffers=buffers,
            quant4=quant4,
            config=_public_config(model),
            architecture=type(model).__name__,
            dtype=DTYPE_NAMES.get(model.dtype, "float32"),
            provenance=provenance or Provenance(source=model_id),
            torch_version=torch.__version__,
            ipc_format=devices.ipc_format if filled.described else None,
            generation_config=_generation_config(model),
        )
        del plan
        disable_cpu_repack(model)
        if filled.segments:
            devices.empty_cache()  # the last sources the segments replaced
        return Shared(handle, arena, mapping, filled.segments, segment_fds)
    except BaseException:
        for fd in [arena.fd, *segment_fds]:
            os.close(fd)
        raise
