"""A bounded number of concurrent calls with a short queue: what keeps a flood of read-only
requests (each `POST /v1/estimate` runs a helper process) from starting processes without
bound. Past the running slots a request waits at most `wait_seconds` in a queue of
`waiting`; past that queue it is refused at once (429), so no request thread is held by a
flood."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.common.errors import TooManyRequests


class Slots:
    def __init__(self, what: str, running: int, waiting: int, wait_seconds: float) -> None:
        self._what = what
        self._running = running
        self._waiting = waiting
        self._wait = wait_seconds
        self._cond = threading.Condition()
        self._busy = 0
        self._queued = 0

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return self._queued

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Run the body in one of the slots, or raise TooManyRequests."""
        self._take()
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify()

    def _take(self) -> None:
        with self._cond:
            if self._busy < self._running:
                self._busy += 1
                return
            if self._queued >= self._waiting:
                raise self._refusal()
            self._queued += 1
            try:
                if not self._cond.wait_for(lambda: self._busy < self._running, self._wait):
                    raise self._refusal()
                self._busy += 1
            finally:
                self._queued -= 1

    def _refusal(self) -> TooManyRequests:
        return TooManyRequests(
            f"{self._running} {self._what} are running and {self._waiting} are waiting: try "
            "again in a few seconds, or ask the operator to raise the limit."
        )
