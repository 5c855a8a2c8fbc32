"""Look a loading strategy up by quantization method."""

from __future__ import annotations

from service.loading.base import Loader
from service.loading.bnb_4bit import Bnb4BitLoader
from service.loading.bnb_8bit import Bnb8BitLoader
from service.loading.full_precision import FullPrecisionLoader
from service.loading.spec import LoadRequest, QuantMethod

LOADERS: dict[QuantMethod | None, type[Loader]] = {
    None: FullPrecisionLoader,
    QuantMethod.BNB_4BIT: Bnb4BitLoader,
    QuantMethod.BNB_8BIT: Bnb8BitLoader,
}


def get_loader(spec: LoadRequest) -> Loader:
    method = spec.quantization.method if spec.quantization is not None else None
    return LOADERS[method]()
