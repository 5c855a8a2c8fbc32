"""One service per state directory: an advisory lock on a file that names the holder.

`flock` is released by the kernel when the process dies however it dies (SIGKILL, OOM), so
a crashed instance never blocks the next one; a live one always does.

The lock file is opened with `O_NOFOLLOW` and must be a regular file of this user: a
symlink planted in its place (pointing at another of this user's files) is refused, never
followed, written or truncated.

The state directory must be this user's and writable by no one else, and so must its
parent (or the parent has the sticky bit, like /tmp): whoever can write the parent could
rename the checked directory away after start and put their own in its place. The lock
keeps an fd of the directory it checked (the lock file is opened through it) and `verify`
tells whether the path still names that directory.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from service.common.private_dir import FolderUnsafe, check_parent, open_folder, open_private

FILENAME = "basehold.lock"
SETTING = "BASEHOLD_STATE_DIR"


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
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock (no-op if this object holds it) or raise StateDirLocked (or
        FolderUnsafe / FileUnsafe: the message says what to change). `wait`: seconds to
        keep trying while another process holds it (a successor waits for its predecessor
        to let go)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self._acquire()
                return
            except StateDirLocked:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def _acquire(self) -> None:
        if self._fd is not None:
            return
        directory = self.path.parent
        # A state directory someone else can write, or swap through its parent, could hold
        # a planted database (whose restore would run checkpoint code) or swap the lock:
        # refuse it first.
        dir_fd = open_folder(directory, SETTING)
        try:
            check_parent(directory, SETTING)
            fd = open_private(self.path, SETTING, dir_fd=dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            os.close(dir_fd)
            raise StateDirLocked(directory, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._dir_fd = fd, dir_fd
        try:
            self.verify()  # nobody swapped it between the checks and the lock
        except FolderUnsafe:
            self.release()
            raise

    def verify(self) -> None:
        """Raise FolderUnsafe unless the state directory's path still names the directory
        that was checked and locked (same device and inode); call it before opening
        anything there by path."""
        if self._dir_fd is None:
            return
        held = os.fstat(self._dir_fd)
        directory = self.path.parent
        try:
            now = os.lstat(directory)
            same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            same = False
        if not same:
            raise FolderUnsafe(
                f"{directory} was replaced after basehold checked and locked it: someone "
                f"renamed it away. Stop the service, find out who, and restart it with a "
                f"{SETTING} in a folder only this user can write."
            )

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
