"""The plain `from_pretrained` model every test and bench compares basehold with.

On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first no-grad forward
(`Linear4bit.support_avx512bf16_for_cpu`), and the tiny test shapes trip its
`N must be divisible by block_n` assert. Held and attached models have that repack turned
off (`disable_cpu_repack`); the reference gets the same treatment, so both sides compute
with the same kernels and the suite passes on every x86 CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from service.common.handles.repack import disable_cpu_repack


def from_pretrained(auto_class: Any, path: str | Path, **kwargs: Any) -> Any:
    model: nn.Module = auto_class.from_pretrained(str(path), **kwargs)
    disable_cpu_repack(model)
    return model.eval()
