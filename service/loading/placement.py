"""The last step of every load: where the held tensors live.

Today the tensors stay in the process's private memory (`PrivateMemory`). The handles work
swaps in a placement that moves them into a shared arena, so leases never need a second
loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from service.memory.resident import copy_out_of_files


@dataclass(frozen=True)
class Placed:
    shareable: bool
    reason: str | None = None
    arena_bytes: int = 0
    handle: Any = None  # service.handles.descriptor.Handle for shareable models


class Placement(Protocol):
    def place(self, model_id: str, model: nn.Module, files: Sequence[Path]) -> Placed: ...

    def release(self, model_id: str) -> None: ...

    def arena_bytes(self) -> int: ...


class PrivateMemory:
    """Keep tensors where transformers put them, but resident: tensors still mapped from the
    checkpoint files are copied out. Such models cannot be leased to workers."""

    def place(self, model_id: str, model: nn.Module, files: Sequence[Path]) -> Placed:
        copy_out_of_files(model, files)
        return Placed(shareable=False, reason="this server keeps models in private memory")

    def release(self, model_id: str) -> None:
        return None

    def arena_bytes(self) -> int:
        return 0
