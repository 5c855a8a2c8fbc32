"""Looking at a service's arenas from outside it, as a same-user process can."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from service.common.handles.memfd import is_sealed


def arena_fds(pid: int, timeout: float = 60) -> dict[str, Path]:
    """The service's open arena memfds: memfd name -> /proc/<pid>/fd/<n>. While the service
    writes a model's snapshot it holds a second fd of that arena for a few seconds: this
    waits until each arena has one fd again (the one that stays), up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[Path]] = {}
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(entry)
            except FileNotFoundError:
                continue
            if target.startswith("/memfd:basehold:"):
                found.setdefault(target.removesuffix(" (deleted)"), []).append(entry)
        if all(len(fds) == 1 for fds in found.values()) or time.monotonic() > deadline:
            return {name: fds[0] for name, fds in found.items()}
        time.sleep(0.05)


def arena_of(pid: int) -> Path:
    """The one arena the service holds."""
    fds = arena_fds(pid)
    assert len(fds) == 1, fds
    return next(iter(fds.values()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sealed(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return is_sealed(fd)
    finally:
        os.close(fd)
