"""bitsandbytes 4-bit (NF4 / FP4, optional double quantization)."""

from __future__ import annotations

from typing import Any, ClassVar

from service.common.load.progress import Phase
from service.common.load.spec import LoadRequest, QuantMethod
from service.loader.strategies.base import TORCH_DTYPES, Loader
from service.loader.strategies.bnb import bitsandbytes_config


class Bnb4BitLoader(Loader):
    method: ClassVar[QuantMethod | None] = QuantMethod.BNB_4BIT
    phase: ClassVar[Phase] = Phase.QUANTIZING

    def quantization_config(self, spec: LoadRequest) -> Any:
        quant = spec.quantization
        assert quant is not None and quant.compute_dtype is not None
        assert quant.quant_type is not None
        return bitsandbytes_config(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type.value,
            bnb_4bit_compute_dtype=TORCH_DTYPES[quant.compute_dtype.value],
            bnb_4bit_use_double_quant=bool(quant.double_quant),
            llm_int8_skip_modules=quant.skip_modules,
        )
