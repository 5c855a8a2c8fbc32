"""Shared by the service and its workers: 4-bit weights that must stay where they are."""

from __future__ import annotations

from torch import nn


def disable_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16 on the first no-grad
    forward, swapping the shared view for a private copy. Held weights must not move."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
