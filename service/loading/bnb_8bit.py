"""bitsandbytes 8-bit (LLM.int8)."""

from __future__ import annotations

from typing import Any, ClassVar

from service.loading.base import Devices, Loader, refuse_disk, refuse_fields
from service.loading.bnb import bitsandbytes_config
from service.loading.progress import Phase
from service.loading.spec import LoadRequest, Quantization, QuantMethod

DEFAULT_THRESHOLD = 6.0


class Bnb8BitLoader(Loader):
    method: ClassVar[QuantMethod | None] = QuantMethod.BNB_8BIT
    phase: ClassVar[Phase] = Phase.QUANTIZING

    def normalize_quantization(self, request: LoadRequest, devices: Devices) -> Quantization:
        quant = request.quantization
        assert quant is not None
        refuse_fields(quant, ("quant_type", "compute_dtype", "double_quant"), "bnb-8bit")
        refuse_disk(request, "bnb-8bit")
        threshold = DEFAULT_THRESHOLD if quant.int8_threshold is None else quant.int8_threshold
        return quant.model_copy(
            update={
                "int8_threshold": threshold,
                "skip_modules": sorted(quant.skip_modules) if quant.skip_modules else None,
            }
        )

    def quantization_config(self, spec: LoadRequest) -> Any:
        quant = spec.quantization
        assert quant is not None
        return bitsandbytes_config(
            load_in_8bit=True,
            llm_int8_threshold=quant.int8_threshold,
            llm_int8_skip_modules=quant.skip_modules,
        )
