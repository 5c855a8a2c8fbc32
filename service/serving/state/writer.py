"""State database writes, outside the locks that decide them, in the order decided.

The registry and the lease table decide under their locks what must be recorded; the
SQLite commit (milliseconds, more on a busy disk) must not run there, or every reader of
the registry waits behind it. So a write is queued under the lock (in decision order) and
run once the thread lets go of its outermost lock: `WriterLock` is a reentrant lock that
does exactly that. A thread that lets go writes what is queued until its own writes are in
the database (in order: those decided before them first); a thread that queued nothing
(a read) never waits for another thread's writes. `flush` writes everything queued so far.

A flush never runs on an event loop (the database refuses writes there): the thread that
queued a write always flushes it itself once it lets go of its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType

log = logging.getLogger("basehold.state")


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class OrderedWriter:
    def __init__(self) -> None:
        # (number, write): numbered in the order queued, which is the order decided.
        self._pending: deque[tuple[int, Callable[[], object]]] = deque()
        self._numbering = threading.Lock()
        self._queued = 0  # the number of the last write queued
        self._written = 0  # the number of the last write run
        self._writing = threading.Lock()
        self._local = threading.local()
        # Runs the writes of one flush in one transaction (`StateDB.batch`, once open).
        self.batch: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext

    def submit(self, write: Callable[[], object]) -> None:
        """Queue `write` (call it with the deciding lock held, so order is kept)."""
        with self._numbering:
            self._queued += 1
            self._pending.append((self._queued, write))
            self._local.last = self._queued

    def _depth(self) -> int:
        return int(getattr(self._local, "depth", 0))

    def enter(self) -> None:
        self._local.depth = self._depth() + 1

    def leave(self) -> None:
        self._local.depth = self._depth() - 1

    def flush(self) -> None:
        """Run every queued write in order, unless this thread still holds a writer lock
        (its outermost one flushes) or runs an event loop."""
        if self._depth() or _on_event_loop():
            return
        self._run()

    def settle(self) -> None:
        """This thread let go of its outermost writer lock: when this returns, the writes
        it queued are in the database (after those queued before them). A thread that
        queued nothing since returns at once, whatever another thread is writing."""
        if self._depth() or _on_event_loop():
            return
        if int(getattr(self._local, "last", 0)) > self._written:
            self._run()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """This thread's writes wait for the end of the block, then run in one batch (a
        restore: one commit instead of one per write)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()
            self.flush()

    def _run(self) -> None:
        with self._writing:
            if not self._pending:
                return
            with self.batch():
                while self._pending:
                    number, write = self._pending.popleft()
                    try:
                        write()
                    except Exception:
                        log.exception("a state database write failed; the next start may differ")
                    self._written = number


class WriterLock:
    """A reentrant lock whose outermost release writes what its thread queued."""

    def __init__(self, writer: OrderedWriter) -> None:
        self._lock = threading.RLock()
        self.writer = writer

    def __enter__(self) -> None:
        self._lock.acquire()
        self.writer.enter()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.writer.leave()
        self._lock.release()
        self.writer.settle()
