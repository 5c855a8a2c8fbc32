"""auto / float32 / float16 / bfloat16, no quantization."""

from __future__ import annotations

from typing import Any, ClassVar

from service.loading.base import Loader
from service.loading.spec import LoadRequest, QuantMethod


class FullPrecisionLoader(Loader):
    method: ClassVar[QuantMethod | None] = None

    def quantization_config(self, spec: LoadRequest) -> Any:
        return None
