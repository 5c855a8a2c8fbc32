"""bitsandbytes is imported only by the strategies that need it, with an install hint."""

from __future__ import annotations

from typing import Any

from service.common.errors import InvalidSpec


def bitsandbytes_config(**kwargs: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise InvalidSpec(
            "bitsandbytes is not installed on this server: `pip install bitsandbytes`, "
            "or load without `quantization`."
        ) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)
