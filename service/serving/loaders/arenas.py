"""The serving process's hold on placed models: each shareable model's arena fd and device
segment fds (the only references the service keeps; workers get duplicates), and each
runner process.

Releasing closes the arena's fd: a worker that still maps it keeps working and the pages
return once the last mapping goes. A device segment's fd is what keeps a GPU allocation
alive once its loader exited; `release(keep_until=...)` keeps those fds until the revoked
leases' TTL has run out after a forced unload, or for the grace after a release or
expiry, so the segment's lifetime rules hold on the fds."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from service.common.errors import ModelNotReady
from service.common.protocol.held import Held
from service.serving.loaders.process import LoaderProcess

log = logging.getLogger("basehold.loaders")


@dataclass
class _Hold:
    fd: int | None  # the arena's (None: a model its runner holds)
    size: int
    segment_fds: list[int] = field(default_factory=list)
    runner: LoaderProcess | None = None
    loader: LoaderProcess | None = None  # the loader that handed it over, exiting


class HeldArenas:
    def __init__(self) -> None:
        self._held: dict[str, _Hold] = {}
        self._retired: list[tuple[datetime, list[int]]] = []
        self._lock = threading.Lock()

    def add(self, load_id: str, held: Held, fds: list[int], loader: LoaderProcess | None) -> None:
        """Keep what `loader` handed over (`fds`: the arena's, then the segments'), and the
        loader itself: as the runner of a model that is not shareable, else until it exits
        (a release waits for that, so memory is back when an unload answers)."""
        handle = held.placed.handle
        size = handle.arena.size if handle is not None else 0
        arena = fds[0] if fds else None
        runner = loader if held.needs_runner else None  # None: no process (tests)
        with self._lock:
            self._held[load_id] = _Hold(arena, size, list(fds[1:]), runner, loader)

    def dup_fds(self, load_id: str) -> list[int]:
        """New fds of the arena and its segments, for sending to a worker (the caller
        closes them). Taken under the lock, so a concurrent release can never hand out a
        recycled fd number."""
        with self._lock:
            held = self._held.get(load_id)
            if held is None or held.fd is None:
                raise ModelNotReady("The model was unloaded; take a new lease once it is held.")
            fds: list[int] = []
            try:
                for fd in [held.fd, *held.segment_fds]:
                    fds.append(os.dup(fd))
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            return fds

    def dup_fd(self, load_id: str) -> int:
        """A new fd of the arena alone (the caller closes it)."""
        arena, *segments = self.dup_fds(load_id)
        for fd in segments:
            os.close(fd)
        return arena

    def runner(self, load_id: str) -> LoaderProcess | None:
        """The process holding a model that is not shareable (None: none, or unloaded)."""
        with self._lock:
            held = self._held.get(load_id)
            return held.runner if held is not None else None

    def release(
        self, load_id: str, keep_until: datetime | None = None, *, handed: bool = False
    ) -> None:
        """Close the arena's fd and end the runner now; the segments' fds now, or at
        `keep_until` when revoked leases may still be reading them. `handed`: a successor
        holds it now: only this side's fds close (the runner lives on, theirs)."""
        with self._lock:
            held = self._held.pop(load_id, None)
            if held is not None and held.segment_fds and keep_until is not None and not handed:
                self._retired.append((keep_until, held.segment_fds))
                log.info("device segments of %s kept until %s", load_id, keep_until)
                held.segment_fds = []
        if held is None:
            return
        for fd in [held.fd, *held.segment_fds]:
            if fd is not None:
                os.close(fd)
        if held.runner is not None and handed:
            held.runner.abandon()
        elif held.runner is not None:
            held.runner.stop()
        elif held.loader is not None and held.loader.wait(5) is None:
            held.loader.kill()  # handed over, yet still there: its mapping goes with it
            held.loader.wait(5)

    def collect(self, now: datetime | None = None) -> int:
        """Close retired segments' fds whose time is up; returns how many."""
        now = now or datetime.now(timezone.utc)
        with self._lock:
            due = [fds for until, fds in self._retired if until <= now]
            self._retired = [item for item in self._retired if item[0] > now]
        for fds in due:
            for fd in fds:
                os.close(fd)
        return sum(len(fds) for fds in due)

    def retired(self) -> int:
        with self._lock:
            return sum(len(fds) for _, fds in self._retired)

    def arena_bytes(self) -> int:
        with self._lock:
            return sum(held.size for held in self._held.values())

    def close(self) -> None:
        """At shutdown: every fd closed and every runner ended."""
        with self._lock:
            load_ids = list(self._held)
            retired = [fd for _, fds in self._retired for fd in fds]
            self._retired = []
        for load_id in load_ids:
            self.release(load_id)
        for fd in retired:
            os.close(fd)
