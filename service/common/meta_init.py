"""Build modules on `meta` without running their weight initializers.

An attach (worker side) builds the model's skeleton on the `meta` device and then binds
every tensor to the arena, and a loader's estimate builds one to price the load, so what
`reset_parameters` writes is thrown away; yet on `meta` each `nn.init.*_` call still runs
torch's Python decomposition under the device mode (about half of an attach's time on a
250M Llama, a third of an estimate's). `skip_meta_init()` makes `torch.nn.init`'s
in-place initializers return a `meta` tensor untouched, which is all they do to one anyway
(it holds no data). Any other tensor, from any thread, still goes to torch's own
initializer, so the patch changes nothing for code running beside the attach; it is
installed only for the block, one block at a time.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn import init

# torch.nn.init's public in-place initializers (what `reset_parameters` methods call).
INITIALIZERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)
_lock = threading.Lock()


def _skipping_meta(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        tensor = args[0] if args else kwargs.get("tensor")
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            return tensor
        return original(*args, **kwargs)

    return initialize


@contextmanager
def skip_meta_init() -> Iterator[None]:
    """Within the block, `torch.nn.init` initializers leave `meta` tensors as they are."""
    with _lock:
        originals = {name: getattr(init, name) for name in INITIALIZERS if hasattr(init, name)}
        for name, original in originals.items():
            setattr(init, name, _skipping_meta(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(init, name, original)
