"""Worker side: turn a handle into an nn.Module whose base weights are the service's memory,
shared, and whose writes stay this worker's own: host tensors are pages of the arena
mapped MAP_PRIVATE (the kernel copies a page on its first write); device segments are
mapped read-only where the driver allows and their tensors are bound as copy-on-write
parameters (`service.worker.copy_on_write`: a write copies that tensor first).
`model.basehold_segments` says, per segment, whether its mapping is read-only.

The skeleton is built from the config on the `meta` device (no memory), 4-bit linears are
swapped for bitsandbytes modules holding the arena's packed weights and QuantState, every
other parameter and buffer is bound to a view of the mapping, and nothing may remain on
`meta`.

Under data parallelism the base stays shared (`service.worker.ddp`): its tensors are
tagged so that any DDP built around the model skips them, FSDP refuses it, and a copy
made anyway warns once with its bytes.
"""

from __future__ import annotations

import copy
import json
import mmap
import os
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from service.common.handles.arena import map_copy_on_write, segment_view, views
from service.common.handles.descriptor import Handle, Quant4Module
from service.common.handles.devices import (
    CUDA,
    DeviceSegments,
    SegmentUnavailable,
    mapped_read_only,
)
from service.common.handles.repack import disable_cpu_repack
from service.common.meta_init import skip_meta_init
from service.common.socket_protocol import ArenaRefused
from service.worker import ddp, hf_meta
from service.worker.copy_on_write import protect_buffer, protect_parameter
from service.worker.socket import receive_fds
from service.worker.timing import phase

SUPPORTED_VERSION = 5


class AttachError(RuntimeError):
    pass


# Configs built from handles' config dicts, by the dict's canonical JSON: built once per
# process, each model gets its own deep copy (a job may change its model's config).
_CONFIGS: dict[str, PretrainedConfig] = {}
CONFIGS_KEPT = 16


def _config(handle: Handle) -> PretrainedConfig:
    # Keyed by content, not model id: a model reloaded under the same id with another
    # config gets its own entry. Nothing of an arena is cached.
    try:
        key: str | None = json.dumps(handle.config, sort_keys=True, default=str)
    except TypeError:  # keys of mixed types (an in-process handle): not cached
        key = None
    config = _CONFIGS.get(key) if key is not None else None
    if config is None:
        config_dict = dict(handle.config)
        config_dict.pop("quantization_config", None)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        if key is None:
            return config
        if len(_CONFIGS) >= CONFIGS_KEPT:
            _CONFIGS.pop(next(iter(_CONFIGS)))
        _CONFIGS[key] = config
    return copy.deepcopy(config)


def _skeleton(handle: Handle) -> nn.Module:
    config = _config(handle)
    model_class = getattr(transformers, handle.architecture, None)
    if model_class is None:
        raise AttachError(
            f"this worker's transformers has no {handle.architecture}; "
            "install the version the service runs"
        )
    with torch.device("meta"), skip_meta_init():
        model: nn.Module = model_class._from_config(config, dtype=getattr(torch, handle.dtype))
    return model


def _linear4bit(
    spec: Quant4Module, arena: dict[str, torch.Tensor], weight: torch.Tensor
) -> nn.Module:
    """A bitsandbytes 4-bit linear on the arena's packed `weight` and QuantState tensors
    (its bias, if any, stays on `meta` until `build` binds it)."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn.modules import Linear4bit, Params4bit

    state = spec.state
    nested = None
    if state.nested_absmax is not None and state.nested_code is not None:
        nested = QuantState(
            absmax=arena[state.nested_absmax],
            code=arena[state.nested_code],
            blocksize=state.nested_blocksize,
            dtype=getattr(torch, state.nested_dtype or "float32"),
        )
    quant_state = QuantState(
        absmax=arena[state.absmax],
        shape=torch.Size(state.shape),
        code=arena[state.code],
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=getattr(torch, state.dtype),
        offset=arena[state.offset] if state.offset is not None else None,
        state2=nested,
    )
    compute = getattr(torch, spec.compute_dtype) if spec.compute_dtype else None
    storage = getattr(torch, spec.quant_storage)
    # device="meta", not the meta device mode: the same tensors without routing every
    # torch call of the constructor through the mode's Python hook.
    module = Linear4bit(
        spec.in_features,
        spec.out_features,
        bias=spec.bias,
        compute_dtype=compute,
        compress_statistics=spec.compress_statistics,
        quant_type=state.quant_type,
        quant_storage=storage,
        device="meta",
    )
    module._parameters["weight"] = Params4bit(
        weight,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=state.blocksize,
        compress_statistics=spec.compress_statistics,
        quant_type=state.quant_type,
        quant_storage=storage,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = quant_state
    return module


def _arena(
    handle: Handle, mapping: mmap.mmap, devices: DeviceSegments, segment_fds: Sequence[int]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Every entry as a tensor (views of the mapped file and of the opened device
    segments), and how each segment was mapped."""
    in_file = [e for e in handle.entries if e.segment is None]
    arena = views(mapping, in_file, handle.arena.data_start)
    opened: list[dict[str, Any]] = []
    for segment in handle.segments:
        if not 1 <= segment.fd_index <= len(segment_fds):
            raise AttachError(
                f"the segment {segment.name} is fd {segment.fd_index} of the arena's, but the "
                f"service sent {len(segment_fds)} segment fd(s)"
            )
        try:
            base = devices.open(segment, segment_fds[segment.fd_index - 1])
        except SegmentUnavailable as exc:
            raise AttachError(str(exc)) from exc
        opened.append(
            {
                "name": segment.name,
                "device_uuid": segment.device_uuid,
                "read_only": mapped_read_only(base),
            }
        )
        for entry in handle.entries:
            if entry.segment == segment.name:
                arena[entry.name] = segment_view(base, entry)
    return arena, opened


def build(
    handle: Handle,
    mapping: mmap.mmap,
    devices: DeviceSegments = CUDA,
    segment_fds: Sequence[int] = (),
) -> nn.Module:
    with phase("views"):
        arena, opened = _arena(handle, mapping, devices, segment_fds)
    on_segment = {e.name for e in handle.entries if e.segment is not None}
    with phase("skeleton"):
        model = _skeleton(handle)
    modules = dict(model.named_modules())  # one walk: kept current as linears are swapped
    with phase("quant4"), skip_meta_init():
        for spec in handle.quant4:
            weight = arena[handle.parameters[f"{spec.module}.weight"]]
            parent, _, leaf = spec.module.rpartition(".")
            module = _linear4bit(spec, arena, weight)
            modules[parent]._modules[leaf] = module
            modules[spec.module] = module
    with phase("bind"):
        quant_weights = {f"{q.module}.weight" for q in handle.quant4}
        shared: dict[str, nn.Parameter] = {}
        for name, entry in handle.parameters.items():
            if name in quant_weights:
                continue
            if entry not in shared:
                # Segment tensors are copy-on-write per tensor (the mapping may be read-only);
                # file tensors need nothing: their pages are private on write.
                shared[entry] = (
                    protect_parameter(arena[entry])
                    if entry in on_segment
                    else nn.Parameter(arena[entry], requires_grad=False)
                )
            owner, _, leaf = name.rpartition(".")
            modules[owner]._parameters[leaf] = shared[entry]
        for name, entry in handle.buffers.items():
            owner, _, leaf = name.rpartition(".")
            modules[owner]._buffers[leaf] = (
                protect_buffer(arena[entry]) if entry in on_segment else arena[entry]
            )
    with phase("check"):
        tensors = list(ddp.tensors(model))  # one walk for the check, the tags, the freeze
        left = [n for n, t in tensors if t.device.type == "meta"]
    if left:
        raise AttachError(f"the handle does not cover {len(left)} tensors, e.g. {left[:3]}")
    with phase("hf_meta"):
        disable_cpu_repack(model)
        hf_meta.apply(model, handle)
        model.basehold_provenance = handle.provenance.model_dump()  # type: ignore[assignment]
        model.basehold_segments = opened  # type: ignore[assignment]
        model.eval()
        for _, tensor in tensors:  # model.requires_grad_(False), without another walk
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(False)
    with phase("ddp"):
        ddp.mark_base(model, (t for _, t in tensors))
        ddp.install()
        start = torch.frombuffer(mapping, dtype=torch.uint8).data_ptr() if len(mapping) else 0
        model.basehold_arena = (start, len(mapping))  # type: ignore[assignment]
        ddp.watch_copies(model, handle.model_id, start, len(mapping))
    return model


def _validated(handle: Handle | dict[str, object], devices: DeviceSegments) -> Handle:
    if not isinstance(handle, Handle):
        handle = Handle.model_validate(handle)
    if handle.version != SUPPORTED_VERSION:
        raise AttachError(
            f"handle version {handle.version} does not match this client's "
            f"({SUPPORTED_VERSION}); upgrade basehold in the worker to the service's version"
        )
    if handle.segments and handle.ipc_format != devices.ipc_format:
        raise AttachError(
            f"the handle's device segments are in the {handle.ipc_format!r} format; this "
            f"worker opens {devices.ipc_format!r}. Run the worker with the service's basehold "
            "version, on the same node."
        )
    return handle


def attach_fd(
    handle: Handle | dict[str, object],
    fd: int,
    devices: DeviceSegments = CUDA,
    segment_fds: Sequence[int] = (),
) -> nn.Module:
    """Map the arena `fd` copy-on-write, open the device segments from `segment_fds` (in
    `fd_index` order, read-only where possible), build the model. The caller keeps the
    fds (close them once attached: the mappings stay valid)."""
    handle = _validated(handle, devices)
    try:
        with phase("map"):
            mapping = map_copy_on_write(fd)
    except ValueError as exc:
        raise AttachError(str(exc)) from exc
    if len(mapping) != handle.arena.size:
        raise AttachError(
            f"the arena has {len(mapping)} bytes, the handle says {handle.arena.size}"
        )
    return build(handle, mapping, devices, segment_fds)


def attach_handle(
    handle: Handle | dict[str, object],
    lease_id: str,
    secret: str,
    devices: DeviceSegments = CUDA,
) -> nn.Module:
    """Fetch the arena's and segments' fds from the service's socket with the lease's id and
    secret, map them, and build the model on them."""
    with phase("validate"):
        handle = _validated(handle, devices)
    try:
        ddp.refuse_sharding_launchers()  # before anything is mapped, let alone copied
    except ddp.ShardedBaseError as exc:
        raise AttachError(str(exc)) from exc
    try:
        with phase("fds"):
            fds = receive_fds(handle.arena.socket, lease_id, secret, handle.socket_uid)
    except ArenaRefused as exc:
        raise AttachError(f"the service refused the arena: {exc.detail}") from exc
    try:
        return attach_fd(handle, fds[0], devices, fds[1:])
    finally:
        for fd in fds:
            os.close(fd)
