"""bitsandbytes 8-bit (LLM.int8)."""

from __future__ import annotations

from typing import Any, ClassVar

from service.loading.base import Loader
from service.loading.bnb import bitsandbytes_config
from service.loading.progress import Phase
from service.loading.spec import LoadRequest, QuantMethod


class Bnb8BitLoader(Loader):
    method: ClassVar[QuantMethod | None] = QuantMethod.BNB_8BIT
    phase: ClassVar[Phase] = Phase.QUANTIZING

    def quantization_config(self, spec: LoadRequest) -> Any:
        quant = spec.quantization
        assert quant is not None
        return bitsandbytes_config(
            load_in_8bit=True,
            llm_int8_threshold=quant.int8_threshold,
            llm_int8_skip_modules=quant.skip_modules,
        )
