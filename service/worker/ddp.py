"""Worker side: an attached base stays shared under whatever builds DDP around it.

DistributedDataParallel broadcasts every parameter and buffer from rank 0 when it is
built (`_sync_module_states`), and buffers again before each forward (`broadcast_buffers`);
on every other rank the broadcast writes into the base, and a write to a copy-on-write
page makes it that rank's own (a full copy of the base per rank; a read-only GPU mapping
would fault). DDP skips the names on `module._ddp_params_and_buffers_to_ignore` of the
module it wraps, at init and at every buffer sync. Those names depend on the wrapper (a
PeftModel prefixes "base_model.model.") and the Trainer, accelerate's `prepare` and
hand-written jobs each build DDP themselves, so no list set at attach time fits them all:
`install()` wraps `DistributedDataParallel.__init__` once per process and, before DDP
reads the list, adds the wrapped module's base tensors (tagged at attach) under their
names as seen from that module. The base is the same held model on every rank, so not
syncing it loses nothing; trainable tensors (adapters) are never tagged and still sync.

FSDP (FullyShardedDataParallel) flattens and shards the tensors it wraps, which copies
them by design: its constructor refuses a module holding an attached base, before any
copy. `accelerate launch` with FSDP or DeepSpeed says so in the environment, and attach
refuses there too (`refuse_sharding_launchers`).

`watch_copies(model, ...)`: whatever else writes into the base (an in-place update, a
wrapper that broadcasts it), the worker warns once with the copied bytes, read from the
arena mapping's anonymous pages in /proc/self/smaps at the first forward and at most
every `CHECK_EVERY_S` after.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("basehold.client")

TAG = "_basehold_base"
CHECK_EVERY_S = 30.0
DOCS = "docs/ddp.md"
USE_INSTEAD = (
    "use DistributedDataParallel instead (torchrun, a plain Trainer, `accelerate launch` "
    "without --use_fsdp/--use_deepspeed): the base is held once per node and only the "
    "adapters need sharding or syncing"
)


class ShardedBaseError(RuntimeError):
    """A wrapper that shards or broadcasts parameters was asked to take an attached base."""


def tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `module`, named as seen from it."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def mark_base(model: nn.Module, walked: Iterable[torch.Tensor] | None = None) -> None:
    """Tag every tensor of the freshly attached `model` as the base's (`walked`: those
    tensors, when the caller has already walked the model for them)."""
    for tensor in (t for _, t in tensors(model)) if walked is None else walked:
        setattr(tensor, TAG, True)


def base_names(module: nn.Module) -> list[str]:
    """The names, as seen from `module` (any wrapper), of the attached bases' tensors."""
    return sorted({name for name, tensor in tensors(module) if getattr(tensor, TAG, False)})


def frozen_base_names(module: nn.Module) -> list[str]:
    """`base_names` less the base parameters a job made trainable (a full fine-tune of
    part of the base): those are written anyway, and their gradients must sync."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return [name for name in base_names(module) if name not in trainable]


def ignore_base(module: nn.Module) -> list[str]:
    """Add `module`'s frozen base tensors to DDP's ignore list on `module`; returns their
    names."""
    names = frozen_base_names(module)
    if names:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Only the module's own list: a PeftModel's getattr falls through to the inner
        # model's, whose names lack the wrapper's prefix.
        # The job's own names stay; ours are recomputed (a base tensor may be trainable now).
        base = set(base_names(module))
        own = module.__dict__.get("_ddp_params_and_buffers_to_ignore", [])
        kept = [name for name in own if name not in base]
        DDP._set_params_and_buffers_to_ignore_for_model(module, sorted({*kept, *names}))
    return names


def refuse_sharding_launchers(environ: dict[str, str] | None = None) -> None:
    """Attach's check, before anything is mapped: `accelerate launch --use_fsdp` or
    `--use_deepspeed` exports these (so do TrainingArguments with `deepspeed=`, if built
    before the attach)."""
    env = os.environ if environ is None else environ
    for variable, what in (
        ("ACCELERATE_USE_FSDP", "FSDP"),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
    ):
        if env.get(variable, "").lower() in ("1", "true", "yes"):
            raise ShardedBaseError(
                f"{variable} is set: {what} shards or broadcasts every parameter it wraps, "
                f"which would copy the attached base into each rank; {USE_INSTEAD} "
                f"(see {DOCS})"
            )


def _ddp_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def init(self: Any, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        ignore_base(module)
        original(self, module, *args, **kwargs)

    init.basehold = True  # type: ignore[attr-defined]
    return init


def _fsdp_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def init(self: Any, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if base_names(module):
            raise ShardedBaseError(
                "FullyShardedDataParallel flattens and shards every parameter it wraps, "
                f"which copies the attached base into each rank; {USE_INSTEAD} (see {DOCS})"
            )
        original(self, module, *args, **kwargs)

    init.basehold = True  # type: ignore[attr-defined]
    return init


def install() -> None:
    """Wrap DDP's and FSDP's constructors, once per process (idempotent)."""
    if not torch.distributed.is_available():
        return  # a torch built without it: no DDP to wrap
    # Already imported by transformers and peft: no import cost here.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.nn.parallel import DistributedDataParallel as DDP

    for cls, wrap in ((DDP, _ddp_init), (FSDP, _fsdp_init)):
        if not getattr(cls.__init__, "basehold", False):
            cls.__init__ = wrap(cls.__init__)  # type: ignore[method-assign]


def copied_bytes(start: int, length: int) -> int:
    """Bytes of the mapping [start, start + length) that this process copied on write (a
    copied page of a private file mapping is anonymous: smaps `Anonymous`)."""
    total, inside = 0, False
    with Path("/proc/self/smaps").open() as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low < start + length and high > start
            elif inside and line.startswith("Anonymous:"):
                total += 1024 * int(line.split()[1])
    return total


def watch_copies(model: nn.Module, label: str, start: int, length: int) -> None:
    """Warn once, with the bytes, when pages of `model`'s arena mapping became private:
    checked at the first forward, then at most every CHECK_EVERY_S."""
    next_check = 0.0

    @torch.compiler.disable  # type: ignore[untyped-decorator]  # host work, outside compiled graphs
    def check(module: nn.Module, args: Any) -> None:
        nonlocal next_check
        now = time.monotonic()
        if now < next_check:
            return
        next_check = now + CHECK_EVERY_S
        copied = copied_bytes(start, length)
        if copied:
            handle.remove()
            message = (
                f"{copied / 2**20:.1f} MiB of the attached base {label} were copied into "
                "this process (something wrote into its shared pages: an in-place update, "
                f"a wrapper that broadcasts or casts it); see {DOCS}"
            )
            log.warning(message)
            warnings.warn(message, stacklevel=2)

    handle = model.register_forward_pre_hook(check)
