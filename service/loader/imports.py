"""What the loader template imports before it forks anything (`service.loader.forker`), and
the check that none of it initialized CUDA."""

from __future__ import annotations

import importlib
import os
import sys

# What the template imports before it says `ready`: the loader side of every load and
# what every from_pretrained imports on first use (~1 s that each loader would pay again),
# with the bnb quantizers. A module that is not there (an older transformers) is skipped.
#
# Nothing here or in LATER may initialize CUDA: a loader forked from a template that did
# fails its first CUDA call ("Cannot re-initialize CUDA in forked subprocess").
# bitsandbytes does at import on a GPU machine (it asks each device's capability), and so
# do `transformers.integrations.bitsandbytes` and peft, which import it: a loader imports
# them after the fork, when a load asks for quantization (service.loader.strategies.bnb).
FIRST = [
    "service.loader.entry",
    "service.loader.child",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.quantizers.quantizer_bnb_4bit",
    "transformers.quantizers.quantizer_bnb_8bit",
    "service.loader.warm",  # transformers' conversion table, built once for every loader
]

# What the template imports once it serves, one module at a time while it has no request
# to answer (a loader forked before then imports what its load needs itself): the model
# code of common architectures, then torch._inductor.compile_fx, most of what `import
# bitsandbytes` costs (its kernels are decorated with torch.compile; preloaded, a
# loader's import of bitsandbytes takes ~0.1 s instead of ~1 s). compile_fx is imported in
# steps of at most ~0.3 s (its heaviest parts first): a request waits for one step at most.
# BASEHOLD_LOADER_PRELOAD adds more (comma-separated module names, e.g. your
# architectures' modeling modules), after these.
LATER = [
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
    "torch._inductor.async_compile",
    "functorch.compile",
    "torch._inductor.debug",
    "torch._inductor.decomposition",
    "torch._inductor.lowering",
    "torch._inductor.compile_fx",
]

PRELOAD = [*FIRST, *LATER]  # basehold's own, in the order imported


# Set by a template for the copy of itself it starts again (`service.loader.forker`) when
# one of PRELOAD's modules initialized CUDA on this machine: those are left to the loaders.
SKIP = "BASEHOLD_LOADER_PRELOAD_SKIP"


def _names(setting: str) -> list[str]:
    return [name.strip() for name in os.environ.get(setting, "").split(",") if name.strip()]


def preload() -> tuple[list[str], list[str]]:
    """What the template imports before it serves, and what it imports once it idles."""
    skipped = set(_names(SKIP))
    later = [*LATER, *_names("BASEHOLD_LOADER_PRELOAD")]
    return (
        [name for name in FIRST if name not in skipped],
        [name for name in later if name not in skipped],
    )


class CudaInitialized(RuntimeError):
    """Importing `module` initialized CUDA in a process that forks: what it forks cannot
    use CUDA."""

    def __init__(self, module: str) -> None:
        super().__init__(module)
        self.module = module


def cuda_initialized() -> bool:
    """Whether this process initialized CUDA (never initializes it to find out; False
    where torch is not imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def import_checked(name: str) -> bool:
    """Import `name`; False where it is not importable here. Raises CudaInitialized when
    the import initialized CUDA, whatever else it raised."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    finally:
        if cuda_initialized():
            raise CudaInitialized(name)  # it outranks what the import raised, if anything
    return True


def import_before_fork(modules: list[str]) -> list[str]:
    """Import `modules` in order; returns those not importable here. Raises CudaInitialized
    naming the first whose import initialized CUDA (checked after each)."""
    if cuda_initialized():
        raise CudaInitialized("(something imported at interpreter start, before the preload)")
    return [name for name in modules if not import_checked(name)]
