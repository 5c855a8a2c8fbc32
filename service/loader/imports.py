"""What the loader template imports before it forks anything (`service.loader.forker`)."""

from __future__ import annotations

import os

# What the template imports before it forks anything: the loader side of every load, what
# every from_pretrained imports on first use (~1 s that each loader would pay again), the
# bitsandbytes integration, and the model code of common architectures. A module that is
# not there (an older transformers) is skipped. BASEHOLD_LOADER_PRELOAD adds more
# (comma-separated module names, e.g. your architectures' modeling modules).
PRELOAD = [
    "service.loader.entry",
    "service.loader.child",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.integrations.bitsandbytes",
    "transformers.quantizers.quantizer_bnb_4bit",
    "transformers.quantizers.quantizer_bnb_8bit",
    *(
        f"transformers.models.{name}.modeling_{name}"
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "phi3",
            "gpt2",
            "bert",
            "t5",
        )
    ),
]


def preload() -> list[str]:
    extra = os.environ.get("BASEHOLD_LOADER_PRELOAD", "")
    return [*PRELOAD, *(name.strip() for name in extra.split(",") if name.strip())]
