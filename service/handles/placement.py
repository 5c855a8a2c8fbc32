"""Placement into a sealed arena: the last step of every load when handles are on."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from service.errors import ModelNotReady
from service.handles.descriptor import Provenance
from service.handles.devices import CUDA, DeviceSegments
from service.handles.share import NotShareableModel, Shared, share
from service.loading.placement import Placed, PrivateMemory

log = logging.getLogger("basehold.handles")


class ArenaPlacement:
    """One sealed memfd arena per model plus one device segment per GPU the model lives on;
    models that cannot be shared stay in private memory with the reason recorded. Workers
    get a copy of an arena's fd over `socket` (see `handles.fdpass`).

    Releasing an arena closes the service's fd; a worker that still maps it keeps working
    and the pages return once the last mapping goes. But a freed device segment would be
    reused under a worker's feet, so `release(keep_until=...)` retires them instead: until
    the revoked leases' TTL has run out after a forced unload, or for the grace after a
    release or expiry (the client stops a lost lease's forward passes before that)."""

    def __init__(self, socket: Path, devices: DeviceSegments = CUDA) -> None:
        self.socket = socket
        self.devices = devices
        self._held: dict[str, Shared] = {}
        self._retired: list[tuple[datetime, list[torch.Tensor]]] = []
        self._private = PrivateMemory()
        self._lock = threading.Lock()

    def place(
        self,
        model_id: str,
        load_id: str,
        model: nn.Module,
        files: Sequence[Path],
        provenance: Provenance,
    ) -> Placed:
        try:
            shared = share(model, model_id, str(self.socket), self.devices, load_id, provenance)
        except NotShareableModel as reason:
            private = self._private.place(model_id, load_id, model, files, provenance)
            return replace(private, reason=str(reason))
        with self._lock:
            self._held[load_id] = shared
        return Placed(shareable=True, handle=shared.handle)

    def dup_fd(self, load_id: str) -> int:
        """A new fd of the arena, for sending to a worker (the caller closes it). Taken
        under the lock, so a concurrent release can never hand out a recycled fd number."""
        with self._lock:
            held = self._held.get(load_id)
            if held is None:
                raise ModelNotReady("The model was unloaded; take a new lease once it is held.")
            return os.dup(held.fd)

    def has_segments(self, load_id: str) -> bool:
        """Whether the model's lent weights include device (GPU) segments."""
        with self._lock:
            held = self._held.get(load_id)
            return bool(held is not None and held.segments)

    def release(self, load_id: str, keep_until: datetime | None = None) -> None:
        """Close the arena's fd. Mappings (ours until the model is freed, workers') stay
        valid; the pages return once the last one goes. Device segments are freed now, or
        at `keep_until` when revoked leases may still be reading them."""
        with self._lock:
            held = self._held.pop(load_id, None)
            if held is not None and held.segments and keep_until is not None:
                self._retired.append((keep_until, held.segments))
                log.info("device segments of %s kept until %s", load_id, keep_until)
        if held is not None:
            os.close(held.fd)

    def collect(self, now: datetime | None = None) -> int:
        """Free retired device segments whose time is up; returns how many were freed."""
        now = now or datetime.now(timezone.utc)
        with self._lock:
            due = [item for item in self._retired if item[0] <= now]
            self._retired = [item for item in self._retired if item[0] > now]
        freed = sum(len(segments) for _, segments in due)
        if due:
            del due
            self.devices.empty_cache()
        return freed

    def retired(self) -> int:
        with self._lock:
            return sum(len(segments) for _, segments in self._retired)

    def arena_bytes(self) -> int:
        with self._lock:
            return sum(shared.handle.arena.size for shared in self._held.values())
