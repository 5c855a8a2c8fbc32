"""Worker side: an attached base stays on the service's pages, in every rank.

- `guard_moves(model)`: `.to()`, `.cpu()`, `.cuda()` ... reach each tensor through
  `Module._apply`; for a base tensor, a move to the device it is already on (`cpu` vs
  `cpu:0`, `cuda:1` vs the same GPU) with its own dtype is a no-op here, where torch would
  copy it (`cpu:0` is not `cpu` to `Tensor.to`). A move that does copy the base (another
  device, another dtype) warns once, naming the bytes: the copy is this process's own.
- `keep_base_out_of_ddp(module)`: names the base's tensors on DDP's ignore list. Every
  DistributedDataParallel built after an attach does this itself
  (`service.worker.ddp`); kept for jobs that call it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger("basehold.client")


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _storage(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr()) if tensor.numel() else 0


def base_storages(model: nn.Module) -> frozenset[int]:
    """The storages of the attached model's base tensors (views of the service's pages)."""
    return frozenset(s for _, t in _tensors(model) if (s := _storage(t)))


def guard_moves(model: nn.Module, model_id: str) -> None:
    """Moves of the attached `model` never copy the base to where it already is; a move
    that copies it warns once."""
    tensors = [t for _, t in _tensors(model)]  # one walk for both
    storages = frozenset(s for t in tensors if (s := _storage(t)))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    model.basehold_storages = storages  # type: ignore[assignment]
    original = model._apply
    warned = False

    def guarded(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        def apply(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal warned
            if _storage(tensor) not in storages:
                return fn(tensor)  # adapters, optimizer state: theirs to move
            try:
                probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            except Exception:
                return fn(tensor)
            if probe.device == tensor.device and probe.dtype == tensor.dtype:
                return tensor  # already there: no copy
            if not warned:
                warned = True
                message = (
                    f"moving the attached base {model_id} to {probe.device} as {probe.dtype} "
                    f"copies its {nbytes / 2**20:.0f} MiB out of the service's shared pages "
                    "into this process; attach on that device instead (a spec with "
                    '"device_map": "cuda:N")'
                )
                log.warning(message)
                warnings.warn(message, stacklevel=3)
            return fn(tensor)

        return apply

    def _apply(fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        return original(guarded(fn), recurse)

    model._apply = _apply  # type: ignore[method-assign]


def keep_base_out_of_ddp(module: nn.Module) -> list[str]:
    """Name `module`'s base tensors (any wrapper around an attached model: a PeftModel,
    ...) in DDP's ignore list; returns the names. DDP built after an attach already does
    it (`service.worker.ddp`)."""
    from service.worker.ddp import ignore_base

    return ignore_base(module)
