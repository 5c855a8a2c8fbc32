"""Load progress and cancellation, fed from transformers' own "Loading weights" loop.

transformers iterates over the checkpoint's tensors through `transformers.utils.logging.tqdm`,
which honours one process-wide hook. We install that hook once; it looks up the tracker of
the *current thread* (each load runs in its own executor thread), counts bytes per tensor
from the safetensors headers, and raises `LoadCancelled` between tensors when asked to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from transformers.utils import logging as hf_logging

from service.errors import LoadCancelled


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

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise LoadCancelled("The load was cancelled by an unload request.")

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


_current = threading.local()
_install_lock = threading.Lock()
_installed = False


class _WeightsBar:
    """Stands in for tqdm around transformers' per-tensor loading loop."""

    def __init__(self, iterable: Any, progress: Progress, sizes: dict[str, int]) -> None:
        self._iterable = iterable
        self._progress = progress
        self._sizes = sizes

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable:
            self._progress.check_cancelled()
            yield item
            name = item[0] if isinstance(item, tuple) and item else item
            self._progress.advance(self._sizes.get(str(name), 0))
        self._progress.check_cancelled()

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def __enter__(self) -> _WeightsBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state = getattr(_current, "state", None)
    if state is not None and args and kwargs.get("desc") == "Loading weights":
        progress, sizes = state
        return _WeightsBar(args[0], progress, sizes)
    return factory(*args, **kwargs)


def _install() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            hf_logging.set_tqdm_hook(_hook)
            _installed = True


@contextmanager
def tracking(progress: Progress, tensor_sizes: dict[str, int]) -> Iterator[None]:
    """Route this thread's "Loading weights" loop into `progress`."""
    _install()
    _current.state = (progress, tensor_sizes)
    try:
        yield
    finally:
        _current.state = None
