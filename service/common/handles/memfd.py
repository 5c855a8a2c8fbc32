"""Sealed memfds, the files an arena lives in: made, sealed and checked without torch (the
serving process makes them too, restoring a snapshot)."""

from __future__ import annotations

import fcntl
import os

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def new_memfd(name: str) -> int:
    """A new, empty memfd named `basehold:{name}` (as /proc/PID/maps shows it), sealable."""
    return os.memfd_create(f"basehold:{name}", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)


def seal(fd: int) -> None:
    """No write, no resize from now on, by anyone: what workers map is what was written."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


def is_sealed(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
