"""Worker side: where an attach's time goes, for the attach bench.

`collect()` opens a collector for the calling thread (or task); while it is open, every
`phase(name)` the attach passes through adds its seconds under `name`. With none open a
phase costs one context-variable read: nothing is timed or stored.

    with timing.collect() as spent, client.attach(model_id) as model:
        ...
    spent  # {"lease_http": 0.004, "fds": 0.001, "skeleton": 0.006, ...}
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Timings = dict[str, float]

_sink: ContextVar[Timings | None] = ContextVar("basehold_attach_timings", default=None)


@contextmanager
def collect() -> Iterator[Timings]:
    """Seconds per phase of what runs inside the block, in this thread only."""
    spent: Timings = {}
    token = _sink.set(spent)
    try:
        yield spent
    finally:
        _sink.reset(token)


class phase:  # lower case: used like a function, `with phase("skeleton"):`
    """Add the block's wall time to the open collector under `name` (if one is open)."""

    __slots__ = ("_name", "_sink", "_start")

    def __init__(self, name: str) -> None:
        self._name = name

    def __enter__(self) -> None:
        self._sink = _sink.get()
        if self._sink is not None:
            self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self._sink is not None:
            spent = time.perf_counter() - self._start
            self._sink[self._name] = self._sink.get(self._name, 0.0) + spent
