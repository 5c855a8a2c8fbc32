"""Look a loading strategy up by quantization method."""

from __future__ import annotations

from service.common.load.spec import LoadRequest, QuantMethod
from service.loader.strategies.base import Loader
from service.loader.strategies.bnb_4bit import Bnb4BitLoader
from service.loader.strategies.bnb_8bit import Bnb8BitLoader
from service.loader.strategies.full_precision import FullPrecisionLoader

LOADERS: dict[QuantMethod | None, type[Loader]] = {
    None: FullPrecisionLoader,
    QuantMethod.BNB_4BIT: Bnb4BitLoader,
    QuantMethod.BNB_8BIT: Bnb8BitLoader,
}


def get_loader(spec: LoadRequest) -> Loader:
    method = spec.quantization.method if spec.quantization is not None else None
    return LOADERS[method]()
