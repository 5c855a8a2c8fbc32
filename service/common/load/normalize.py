"""Normalize a load request: fill defaults and refuse impossible combinations, so identical
loads compare equal. Torch-free: the serving process runs it at POST."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.common.cuda import CudaProbe
from service.common.errors import InvalidSpec
from service.common.load.device_map import normalize_device_map, normalize_max_memory
from service.common.load.spec import (
    ComputeDType,
    DType,
    LoadRequest,
    Quantization,
    QuantMethod,
    QuantType,
    Task,
)

_LABEL_TASKS = (Task.SEQ_CLS, Task.TOKEN_CLS)
DEFAULT_INT8_THRESHOLD = 6.0


@dataclass(frozen=True)
class Devices:
    """What the placement can target on this node."""

    cuda_count: int
    # Each GPU's UUID by index ("GPU-…"), to resolve devices named by UUID; empty when
    # the probe does not say (a GPU named by UUID is then not found).
    uuids: tuple[str, ...] = ()

    @classmethod
    def of(cls, cuda: CudaProbe) -> Devices:
        """What `cuda` (the serving process's view: NVML, CUDA_VISIBLE_DEVICES) sees."""
        count = cuda.device_count()
        return cls(cuda_count=count, uuids=tuple(cuda.uuids()) if count else ())


def compute_dtype_default(spec: LoadRequest, devices: Devices) -> str:
    if spec.dtype != DType.AUTO:
        return spec.dtype.value
    return "bfloat16" if devices.cuda_count else "float32"


def refuse_fields(quantization: Quantization, fields: tuple[str, ...], method: str) -> None:
    given = [name for name in fields if getattr(quantization, name) is not None]
    if given:
        raise InvalidSpec(f"{', '.join(given)} do(es) not apply to {method}; remove them.")


def refuse_disk(spec: LoadRequest, method: str) -> None:
    if isinstance(spec.device_map, dict) and "disk" in spec.device_map.values():
        raise InvalidSpec(
            f"{method} weights cannot be offloaded to disk; put those modules on cpu or a GPU."
        )


def _bnb_4bit(request: LoadRequest, quant: Quantization, devices: Devices) -> Quantization:
    refuse_fields(quant, ("int8_threshold",), "bnb-4bit")
    refuse_disk(request, "bnb-4bit")
    return quant.model_copy(
        update={
            "quant_type": quant.quant_type or QuantType.NF4,
            "compute_dtype": quant.compute_dtype
            or ComputeDType(compute_dtype_default(request, devices)),
            "double_quant": bool(quant.double_quant),
            "skip_modules": sorted(quant.skip_modules) if quant.skip_modules else None,
        }
    )


def _bnb_8bit(request: LoadRequest, quant: Quantization, devices: Devices) -> Quantization:
    refuse_fields(quant, ("quant_type", "compute_dtype", "double_quant"), "bnb-8bit")
    refuse_disk(request, "bnb-8bit")
    threshold = DEFAULT_INT8_THRESHOLD if quant.int8_threshold is None else quant.int8_threshold
    return quant.model_copy(
        update={
            "int8_threshold": threshold,
            "skip_modules": sorted(quant.skip_modules) if quant.skip_modules else None,
        }
    )


QUANTIZATION: dict[QuantMethod, Callable[[LoadRequest, Quantization, Devices], Quantization]] = {
    QuantMethod.BNB_4BIT: _bnb_4bit,
    QuantMethod.BNB_8BIT: _bnb_8bit,
}


def normalize(request: LoadRequest, devices: Devices) -> LoadRequest:
    if request.num_labels is not None and request.task not in (*_LABEL_TASKS, None):
        raise InvalidSpec(f"num_labels applies to seq-cls and token-cls, not {request.task.value}.")
    if request.base_model is not None and not request.source.startswith("/"):
        raise InvalidSpec(
            "base_model names the hub model a local checkpoint is a copy of; a hub source "
            "names itself. Drop base_model."
        )
    if request.attn_implementation == "flash_attention_2" and not devices.cuda_count:
        raise InvalidSpec("flash_attention_2 needs a CUDA device; use sdpa or eager.")
    device_map = normalize_device_map(
        request.device_map, request.offload, devices.cuda_count, devices.uuids
    )
    max_memory = normalize_max_memory(
        request.max_memory, device_map, devices.cuda_count, devices.uuids
    )
    quant = request.quantization
    quantization = QUANTIZATION[quant.method](request, quant, devices) if quant else None
    return request.model_copy(
        update={"device_map": device_map, "max_memory": max_memory, "quantization": quantization}
    )
