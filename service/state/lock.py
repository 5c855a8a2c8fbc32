"""One service per state directory: an advisory lock on a file that names the holder.

`flock` is released by the kernel when the process dies however it dies (SIGKILL, OOM), so
a crashed instance never blocks the next one; a live one always does.

The lock file is opened with `O_NOFOLLOW` and must be a regular file of this user: a
symlink planted in its place (pointing at another of this user's files) is refused, never
followed, written or truncated.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from service.private_dir import check_private, open_private

FILENAME = "basehold.lock"


class StateDirLocked(RuntimeError):
    """Another live process holds this state directory."""

    def __init__(self, directory: Path, pid: str) -> None:
        super().__init__(
            f"another basehold (pid {pid}) is serving the state directory {directory}. Stop "
            "it, or give this one its own BASEHOLD_STATE_DIR."
        )
        self.pid = pid


class StateLock:
    def __init__(self, directory: Path) -> None:
        self.path = directory / FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (no-op if this object holds it) or raise StateDirLocked."""
        if self._fd is not None:
            return
        # A state directory someone else can write could hold a planted database (whose
        # restore would run checkpoint code) or swap the lock: refuse it first.
        check_private(self.path.parent, "BASEHOLD_STATE_DIR")
        fd = open_private(self.path, "BASEHOLD_STATE_DIR")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLocked(self.path.parent, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
