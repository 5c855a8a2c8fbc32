"""Placement into a sealed arena: the last step of every load when handles are on."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from torch import nn

from service.common.errors import ModelNotReady
from service.common.handles.descriptor import Provenance
from service.common.handles.devices import CUDA, DeviceSegments
from service.common.protocol.held import Placed
from service.loader.ahead import Ahead
from service.loader.placement import PrivateMemory
from service.loader.share import NotShareableModel, Shared, share

log = logging.getLogger("basehold.handles")


class ArenaPlacement:
    """In the loader: one sealed memfd arena per model plus the device segments of the GPU
    the model lives on (several, filled one after another: `service.loader.segment_fill`);
    models that cannot be shared (a segment that cannot be made or exported included) stay
    in private memory with the reason recorded. The loader passes the fds up to the
    service (`Shared.fds`), which keeps them and lends copies to workers over `socket` (see
    `handles.fdpass`)."""

    takes_prefetch = True

    def __init__(self, socket: Path, devices: DeviceSegments = CUDA) -> None:
        self.socket = socket
        self.devices = devices
        self._held: dict[str, Shared] = {}
        self._private = PrivateMemory()
        self._lock = threading.Lock()

    def place(
        self,
        model_id: str,
        load_id: str,
        model: nn.Module,
        files: Sequence[Path],
        provenance: Provenance,
        prefetch: Ahead | None = None,
    ) -> Placed:
        try:
            shared = share(
                model, model_id, str(self.socket), self.devices, load_id, provenance, prefetch
            )
        except NotShareableModel as reason:
            if prefetch is not None:
                prefetch.close()  # before the private copy: never two models at once
            private = self._private.place(model_id, load_id, model, files, provenance)
            return replace(private, reason=str(reason))
        with self._lock:
            self._held[load_id] = shared
        return Placed(shareable=True, handle=shared.handle)

    def shared(self, load_id: str) -> Shared | None:
        """The placed arena and segments (the loader passes their fds to the service)."""
        with self._lock:
            return self._held.get(load_id)

    def dup_fd(self, load_id: str) -> int:
        """A new fd of the arena (the caller closes it)."""
        with self._lock:
            held = self._held.get(load_id)
            if held is None:
                raise ModelNotReady("The model was unloaded; take a new lease once it is held.")
            return os.dup(held.fd)

    def release(self, load_id: str, keep_until: datetime | None = None) -> None:
        """Close this process's fds of the arena and segments; mappings stay valid and the
        memory returns once the last fd or mapping anywhere goes."""
        with self._lock:
            held = self._held.pop(load_id, None)
        if held is not None:
            held.close()
