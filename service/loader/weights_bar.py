"""Progress fed from transformers' own "Loading weights" loop (in the loader process).

transformers iterates over the checkpoint's tensors through `transformers.utils.logging.tqdm`,
which honours one process-wide hook. We install that hook once; it looks up the tracker of
the *current thread*, counts bytes per tensor from the safetensors headers, and raises
`LoadCancelled` between tensors when asked to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transformers.utils import logging as hf_logging

from service.common.load.progress import Progress

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
