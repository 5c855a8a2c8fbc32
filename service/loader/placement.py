"""The last step of every load: where the held tensors live.

Loaders use `handles.placement.ArenaPlacement`, which moves the tensors into a shared arena
(and device segments) whose fds go to the service; models that cannot be shared fall back
to `PrivateMemory`, held by their loader as their runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

from torch import nn

from service.common.handles.descriptor import Provenance
from service.common.protocol.held import Placed
from service.loader.ahead import Ahead
from service.loader.resident import copy_out_of_files


class Placement(Protocol):
    """Placements are keyed by `load_id` (unique per load), never by the model id alone.
    `takes_prefetch`: whether `place` makes use of an arena written while the model loads
    (`service.loader.ahead`: the checkpoint's bytes copied, or the casts written into a
    memfd); the caller closes it after."""

    takes_prefetch: bool

    def place(
        self,
        model_id: str,
        load_id: str,
        model: nn.Module,
        files: Sequence[Path],
        provenance: Provenance,
        prefetch: Ahead | None = None,
    ) -> Placed: ...

    def release(self, load_id: str, keep_until: datetime | None = None) -> None: ...


class PrivateMemory:
    """Keep tensors where transformers put them, but resident: tensors still mapped from the
    checkpoint files are copied out. Such models cannot be leased to workers."""

    takes_prefetch = False

    def place(
        self,
        model_id: str,
        load_id: str,
        model: nn.Module,
        files: Sequence[Path],
        provenance: Provenance,
        prefetch: Ahead | None = None,
    ) -> Placed:
        copy_out_of_files(model, files)
        return Placed(shareable=False, reason="this server keeps models in private memory")

    def release(self, load_id: str, keep_until: datetime | None = None) -> None:
        return None
