"""The shared loading steps; strategies (one per file) fill in quantization.

Like vLLM's `BaseModelLoader`: `get_loader(spec)` looks the strategy up in a dict, the base
class builds the from_pretrained call, a subclass says how it quantizes and which options
it accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from service.errors import InvalidSpec
from service.loading.device_map import (
    accelerate_device_map,
    accelerate_max_memory,
    normalize_device_map,
    normalize_max_memory,
)
from service.loading.progress import Phase
from service.loading.spec import DType, LoadRequest, Quantization, QuantMethod, Task
from service.loading.tasks import auto_class

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_LABEL_TASKS = (Task.SEQ_CLS, Task.TOKEN_CLS)


@dataclass(frozen=True)
class Devices:
    """What the placement can target on this node."""

    cuda_count: int


class Loader(ABC):
    method: ClassVar[QuantMethod | None]
    phase: ClassVar[Phase] = Phase.LOADING

    def normalize(self, request: LoadRequest, devices: Devices) -> LoadRequest:
        """Fill defaults and refuse impossible combinations; identical loads compare equal."""
        if request.num_labels is not None and request.task not in (*_LABEL_TASKS, None):
            raise InvalidSpec(
                f"num_labels applies to seq-cls and token-cls, not {request.task.value}."
            )
        if request.base_model is not None and not request.source.startswith("/"):
            raise InvalidSpec(
                "base_model names the hub model a local checkpoint is a copy of; a hub source "
                "names itself. Drop base_model."
            )
        if request.attn_implementation == "flash_attention_2" and not devices.cuda_count:
            raise InvalidSpec("flash_attention_2 needs a CUDA device; use sdpa or eager.")
        device_map = normalize_device_map(request.device_map, request.offload, devices.cuda_count)
        max_memory = normalize_max_memory(request.max_memory, device_map, devices.cuda_count)
        quantization = self.normalize_quantization(request, devices)
        return request.model_copy(
            update={
                "device_map": device_map,
                "max_memory": max_memory,
                "quantization": quantization,
            }
        )

    @abstractmethod
    def normalize_quantization(
        self, request: LoadRequest, devices: Devices
    ) -> Quantization | None: ...

    @abstractmethod
    def quantization_config(self, spec: LoadRequest) -> Any: ...

    def load(
        self,
        spec: LoadRequest,
        path: Path,
        task: Task,
        config: PretrainedConfig,
        offload_folder: Path | None,
    ) -> nn.Module:
        kwargs: dict[str, Any] = {
            "config": config,
            "dtype": "auto" if spec.dtype == DType.AUTO else TORCH_DTYPES[spec.dtype.value],
            "device_map": accelerate_device_map(spec.device_map),
            "trust_remote_code": spec.trust_remote_code,
        }
        if spec.max_memory is not None:
            kwargs["max_memory"] = accelerate_max_memory(spec.max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
        if spec.num_labels is not None:
            # A new label count means a new head: re-initialise it instead of refusing.
            kwargs["ignore_mismatched_sizes"] = True
        if spec.attn_implementation is not None:
            kwargs["attn_implementation"] = spec.attn_implementation.value
        quant = self.quantization_config(spec)
        if quant is not None:
            kwargs["quantization_config"] = quant
        model = auto_class(task).from_pretrained(str(path), **kwargs)
        model.eval()
        model.requires_grad_(False)
        return model


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
