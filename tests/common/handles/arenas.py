"""Looking at a service's arenas from outside it, as a same-user process can."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from service.common.handles.arena import is_sealed


def arena_fds(pid: int) -> dict[str, Path]:
    """The service's open arena memfds: memfd name -> /proc/<pid>/fd/<n>."""
    found = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:basehold:"):
            found[target.removesuffix(" (deleted)")] = entry
    return found


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
