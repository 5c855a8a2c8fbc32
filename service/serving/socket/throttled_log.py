"""Log lines that anyone can provoke, at most one per kind a minute, with a count.

A client that reconnects in a loop (turned away, cut off, refused) would otherwise write a
line per attempt: gigabytes an hour. The first line of a kind in a window is logged as
is; the rest of that window are counted, and the next line of that kind (or, once the
window is over, a line of its own) says how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Kind:
    next_at: float = 0.0
    left_out: int = 0


class ThrottledLog:
    """`warning(kind, ...)` logs at most once per `every` seconds per kind; `flush_due()`
    (call it now and then) logs the count of what was left out once a window is over.
    Thread-safe."""

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[str, _Kind] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            state = self._kinds.setdefault(kind, _Kind())
            if now < state.next_at:
                state.left_out += 1
                return
            left_out, state.left_out = state.left_out, 0
            state.next_at = now + self._every
        if left_out:
            message += " (and %d more like it left out of the log)"
            args = (*args, left_out)
        self._logger.warning(message, *args)

    def flush_due(self) -> None:
        """Say how many lines of each kind were left out in a window that is over."""
        now = self._clock()
        due: list[tuple[str, int]] = []
        with self._lock:
            for kind, state in self._kinds.items():
                if state.left_out and now >= state.next_at:
                    due.append((kind, state.left_out))
                    state.left_out = 0
                    state.next_at = now + self._every
        for kind, left_out in due:
            self._logger.warning(
                "%d more like %r left out of the log in the last %.0f s",
                left_out,
                kind,
                self._every,
            )
