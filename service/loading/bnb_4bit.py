"""bitsandbytes 4-bit (NF4 / FP4, optional double quantization)."""

from __future__ import annotations

from typing import Any, ClassVar

from service.loading.base import (
    TORCH_DTYPES,
    Devices,
    Loader,
    compute_dtype_default,
    refuse_disk,
    refuse_fields,
)
from service.loading.bnb import bitsandbytes_config
from service.loading.progress import Phase
from service.loading.spec import ComputeDType, LoadRequest, Quantization, QuantMethod, QuantType


class Bnb4BitLoader(Loader):
    method: ClassVar[QuantMethod | None] = QuantMethod.BNB_4BIT
    phase: ClassVar[Phase] = Phase.QUANTIZING

    def normalize_quantization(self, request: LoadRequest, devices: Devices) -> Quantization:
        quant = request.quantization
        assert quant is not None
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
