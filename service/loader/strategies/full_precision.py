"""auto / float32 / float16 / bfloat16, no quantization."""

from __future__ import annotations

from typing import Any, ClassVar

from service.common.load.spec import LoadRequest, QuantMethod
from service.loader.strategies.base import Loader


class FullPrecisionLoader(Loader):
    method: ClassVar[QuantMethod | None] = None

    def quantization_config(self, spec: LoadRequest) -> Any:
        return None
