"""Placement into the shared arena: the last step of every load when handles are on."""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from service.handles.descriptor import Handle
from service.handles.share import NotShareableModel, share
from service.loading.placement import Placed, PrivateMemory

log = logging.getLogger("basehold.handles")


class ArenaPlacement:
    """One arena file per model under `directory` (in /dev/shm); models that cannot be
    shared stay in private memory with the reason recorded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: dict[str, tuple[Handle, mmap.mmap]] = {}
        self._private = PrivateMemory()
        self._lock = threading.Lock()

    def clean_stale(self) -> int:
        """Remove arenas a previous process left (their workers keep their mappings)."""
        removed = 0
        for path in [*self.directory.glob("*.safetensors"), *self.directory.glob("*.tmp")]:
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def place(self, model_id: str, model: nn.Module, files: Sequence[Path]) -> Placed:
        try:
            handle, mapping = share(model, model_id, self.directory)
        except NotShareableModel as reason:
            return replace(self._private.place(model_id, model, files), reason=str(reason))
        with self._lock:
            self._held[model_id] = (handle, mapping)
        return Placed(shareable=True, handle=handle)

    def release(self, model_id: str) -> None:
        """Unlink the arena. Mappings (ours until the model is freed, workers') stay valid;
        the pages return once the last one goes."""
        with self._lock:
            held = self._held.pop(model_id, None)
        if held is not None:
            Path(held[0].arena.path).unlink(missing_ok=True)

    def arena_bytes(self) -> int:
        with self._lock:
            return sum(handle.arena.size for handle, _ in self._held.values())
