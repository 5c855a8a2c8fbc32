"""Worker side: make an attached model look to the Hugging Face stack exactly like a
`from_pretrained` of the same spec.

- Name and provenance: `name_or_path` (and `config._name_or_path`) is the hub id for hub
  loads (or the hub model a local load says it is a copy of: `base_model`), so PEFT, TRL
  and `save_pretrained` record it; other local loads are named by their checkpoint
  directory, as a plain `from_pretrained` of it names them. `config._commit_hash` carries
  the hub commit.
- The checkpoint's `generation_config` (eos lists, sampling settings), not one derived
  from the config.
- For bitsandbytes 4-bit bases: `config.quantization_config`, `is_quantized`,
  `quantization_method`, `is_loaded_in_4bit` and an `hf_quantizer` built from the
  handle, as transformers' quantizer sets them after loading. With them PEFT dispatches its
  bitsandbytes LoRA layers, TRL and `prepare_model_for_kbit_training` take their QLoRA
  paths, and `merge_and_unload()` re-quantizes merged weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.quantizers.auto import AutoHfQuantizer

from service.common.handles.descriptor import Handle


def model_name(handle: Handle) -> str:
    return handle.provenance.base_name


def apply(module: nn.Module, handle: Handle) -> None:
    model: Any = module  # attributes transformers sets on its models, not nn.Module's
    name = model_name(handle)
    model.name_or_path = name
    config: Any = model.config
    config._name_or_path = name
    if handle.provenance.revision is not None:
        config._commit_hash = handle.provenance.revision
    if handle.generation_config is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config = GenerationConfig.from_dict(dict(handle.generation_config))
    quantization = handle.config.get("quantization_config")
    if handle.quant4 and quantization is not None:
        _mark_quantized(model, quantization)


def _mark_quantized(model: Any, quantization: dict[str, Any]) -> None:
    quantizer = AutoHfQuantizer.from_config(dict(quantization), pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.config.quantization_config = quantizer.quantization_config
    model.is_loaded_in_4bit = True
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True
