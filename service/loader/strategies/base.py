"""The shared loading steps; strategies (one per file) fill in quantization.

Like vLLM's `BaseModelLoader`: `get_loader(spec)` looks the strategy up in a dict, the base
class builds the from_pretrained call, a subclass says how it quantizes and which options
it accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from service.common.load.device_map import accelerate_device_map, accelerate_max_memory
from service.common.load.progress import Phase
from service.common.load.spec import DType, LoadRequest, QuantMethod, Task
from service.loader.tasks import auto_class

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class Loader(ABC):
    method: ClassVar[QuantMethod | None]
    phase: ClassVar[Phase] = Phase.LOADING

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
