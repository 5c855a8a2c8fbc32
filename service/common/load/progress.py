"""Load progress and cancellation: written in the loader process (see
`service.loader.weights_bar`), mirrored in the serving process from the loader's messages."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from service.common.errors import LoadCancelled


class Phase(str, Enum):
    RESOLVING = "resolving"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    QUANTIZING = "quantizing"
    SHARING = "sharing"
    DONE = "done"


@dataclass
class Progress:
    """Mutable progress of one load; written by the load thread, read by the API."""

    phase: Phase = Phase.RESOLVING
    bytes_done: int = 0
    bytes_total: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    on_change: Callable[[Progress], None] | None = None

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._changed()

    def set_total(self, total: int) -> None:
        self.bytes_total = total
        self._changed()

    def advance(self, nbytes: int) -> None:
        done = self.bytes_done + nbytes
        self.bytes_done = min(done, self.bytes_total) if self.bytes_total else done
        self._changed()

    def finish(self) -> None:
        self.bytes_done = self.bytes_total
        self.phase = Phase.DONE
        self._changed()

    def mirror(self, phase: str, bytes_done: int, bytes_total: int) -> None:
        """Take the loader process's figures (serving side)."""
        self.phase = Phase(phase)
        self.bytes_total = bytes_total
        self.bytes_done = bytes_done
        self._changed()

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise LoadCancelled("The load was cancelled by an unload request.")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)
