"""The last step of every load: where the held tensors live.

Today the tensors stay where transformers put them (`KeepInPlace`). The handles work swaps in
a placement that moves them into a shared arena, so leases never need a second loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn


@dataclass(frozen=True)
class Placed:
    shareable: bool
    reason: str | None = None
    arena_bytes: int = 0


class Placement(Protocol):
    def place(self, model_id: str, model: nn.Module) -> Placed: ...

    def release(self, model_id: str) -> None: ...


class KeepInPlace:
    """Keep tensors as loaded; such models cannot be leased to workers."""

    def place(self, model_id: str, model: nn.Module) -> Placed:
        return Placed(shareable=False, reason="this server keeps models in private memory")

    def release(self, model_id: str) -> None:
        return None
