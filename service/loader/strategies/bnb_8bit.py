"""bitsandbytes 8-bit (LLM.int8)."""

from __future__ import annotations

from typing import Any, ClassVar

from service.common.load.progress import Phase
from service.common.load.spec import LoadRequest, QuantMethod
from service.loader.strategies.base import Loader
from service.loader.strategies.bnb import bitsandbytes_config


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
