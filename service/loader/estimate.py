"""How much memory a load will take, from the config alone (meta device, no weights read).
A model lent from a GPU is priced at its peak there: the model plus the one device segment
being filled while it is placed (`service.loader.segment_chunks`).

The model is built on the `meta` device with accelerate's `init_empty_weights`; each tensor
is priced at the dtype it will have, bitsandbytes-quantized linears at their packed size
plus quantization state (which linears transformers quantizes: its own
`get_keys_to_not_convert`); tied weights count once. accelerate's `infer_auto_device_map`
places it for the auto/balanced/sequential strategies, as from_pretrained does.
"""

from __future__ import annotations

from typing import Any

import psutil
import torch
from accelerate import init_empty_weights
from accelerate.utils import CustomDtype, get_balanced_memory, infer_auto_device_map
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from service.common.cuda import CudaProbe
from service.common.estimates import Estimate
from service.common.handles.devices import DEVICE_ALIGN
from service.common.load.device_map import accelerate_max_memory
from service.common.load.spec import DType, LoadRequest, QuantMethod, Task
from service.common.meta_init import skip_meta_init
from service.loader import segment_chunks
from service.loader.tasks import auto_class

_BLOCK = 64  # bitsandbytes 4-bit blocksize
_NESTED_BLOCK = 256


def _dtype(spec: LoadRequest, config: PretrainedConfig) -> torch.dtype:
    if spec.dtype != DType.AUTO:
        return getattr(torch, spec.dtype.value)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _quantized_bytes(numel: int, spec: LoadRequest, rows: int) -> int:
    quant = spec.quantization
    assert quant is not None
    if quant.method == QuantMethod.BNB_8BIT:
        return numel + rows * 4  # int8 weight + per-row scale (SCB)
    blocks = -(-numel // _BLOCK)
    if quant.double_quant:
        stats = blocks + (-(-blocks // _NESTED_BLOCK)) * 4 + 256 * 4 + 4  # u8 absmax + nested
    else:
        stats = blocks * 4
    return -(-numel // 2) + stats + 16 * 4  # packed nibbles + absmax + code


def skeleton(spec: LoadRequest, config: PretrainedConfig, task: Task) -> nn.Module:
    with init_empty_weights(include_buffers=True), skip_meta_init():
        model: nn.Module = auto_class(task).from_config(
            config, dtype=_dtype(spec, config), trust_remote_code=spec.trust_remote_code
        )
    return model


def _prices(model: nn.Module, spec: LoadRequest) -> dict[str, int]:
    """Bytes per parameter/buffer name once loaded (tied tensors only under one name)."""
    keep32 = [
        *(getattr(model, "_keep_in_fp32_modules", None) or []),
        *(getattr(model, "_keep_in_fp32_modules_strict", None) or []),
    ]
    quantized: set[str] = set()
    if spec.quantization is not None:
        skip = [*get_keys_to_not_convert(model), *(spec.quantization.skip_modules or []), *keep32]
        quantized = {
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and should_convert_module(name, skip)
        }
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    # from_pretrained keeps these in float32 where the model would otherwise be float16.
    fp32_kept = keep32 if (_dtype_of(model) == torch.float16 or quantized) else []
    prices: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if name in quantized:
            rows = tensor.shape[1] if name in conv1d else tensor.shape[0]
            prices[name] = _quantized_bytes(tensor.numel(), spec, rows)
        elif (
            tensor.is_floating_point()
            and fp32_kept
            and not should_convert_module(name.rpartition(".")[0], fp32_kept)
        ):
            prices[name] = tensor.numel() * 4
        else:  # the skeleton already has each tensor's loaded dtype (incl. fp32-kept modules)
            prices[name] = tensor.numel() * tensor.element_size()
    return prices


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _placement(model: nn.Module, spec: LoadRequest, cuda: CudaProbe) -> dict[str, str]:
    """Where accelerate would put each module. GPUs are what the `cuda` seam says (never
    torch directly): without `max_memory`, each GPU offers its free bytes, as accelerate's
    own default does."""
    device_map = spec.device_map
    if isinstance(device_map, dict):
        return {k: str(v) for k, v in device_map.items()}
    if device_map in ("cpu",) or device_map.startswith("cuda:"):
        return {"": device_map}
    max_memory = accelerate_max_memory(spec.max_memory)
    count = cuda.device_count()
    if not count and not max_memory:
        return {"": "cpu"}
    if not max_memory:
        max_memory = {i: cuda.memory(i).free_bytes for i in range(count)}
        max_memory["cpu"] = psutil.virtual_memory().available
    no_split = getattr(model, "_no_split_modules", None) or []
    dtype: Any = (
        CustomDtype.INT4
        if spec.quantization and spec.quantization.method == (QuantMethod.BNB_4BIT)
        else _dtype_of(model)
    )
    if device_map in ("balanced", "balanced_low_0") and count:
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    mapping = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    return {k: f"cuda:{v}" if isinstance(v, int) else str(v) for k, v in mapping.items()}


def _device_for(name: str, placement: dict[str, str]) -> str:
    best, device = -1, placement.get("", "cpu")
    for prefix, target in placement.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), target
    return device


def estimate_model(model: nn.Module, spec: LoadRequest, cuda: CudaProbe) -> Estimate:
    prices = _prices(model, spec)
    placement = _placement(model, spec, cuda)
    by_device: dict[str, int] = {}
    for name, nbytes in prices.items():
        device = _device_for(name, placement)
        by_device[device] = by_device.get(device, 0) + nbytes
    layers = [
        m
        for m in model.modules()
        if type(m).__name__ in (getattr(model, "_no_split_modules", None) or [])
    ]
    layer_names = {id(m): n for n, m in model.named_modules()}
    largest = max(
        (
            sum(v for k, v in prices.items() if k.startswith(layer_names[id(m)] + "."))
            for m in layers
        ),
        default=max(prices.values(), default=0),
    )
    placing = _placing_bytes(model, spec, prices, by_device)
    if placing:
        [device] = by_device
        by_device[device] += placing
    return Estimate(sum(prices.values()), by_device, largest, placing_bytes=placing)


def _placing_bytes(
    model: nn.Module, spec: LoadRequest, prices: dict[str, int], by_device: dict[str, int]
) -> int:
    """What moving the loaded model into device segments adds to its GPU's peak (one
    segment being filled: `service.loader.segment_chunks`). Only a model that will be lent
    is moved: all on one GPU, no 8-bit weights, no remote code (`service.loader.share`)."""
    [*devices] = by_device
    if len(devices) != 1 or not devices[0].startswith("cuda"):
        return 0
    quant = spec.quantization
    if (quant is not None and quant.method == QuantMethod.BNB_8BIT) or getattr(
        getattr(model, "config", None), "auto_map", None
    ):
        return 0
    return segment_chunks.placing_bytes(list(prices.items()), DEVICE_ALIGN)


def estimate(spec: LoadRequest, config: PretrainedConfig, task: Task, cuda: CudaProbe) -> Estimate:
    return estimate_model(skeleton(spec, config, task), spec, cuda)
