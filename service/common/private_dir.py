"""Folders only this user can change: the state directory, the socket's folder and the
node-features folder.

Whoever can write such a folder can plant or swap what basehold trusts in it (a state
database that runs checkpoint code at restore, a socket that serves forged weights), so
basehold refuses to start on one that another user owns or can write.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class FolderUnsafe(RuntimeError):
    """A folder basehold trusts could be changed by someone else; the message says what to
    change."""


class FileUnsafe(FolderUnsafe):
    """A file basehold keeps in such a folder is a symlink or not this user's regular file."""


def open_private(path: Path, setting: str, *, dir_fd: int | None = None) -> int:
    """Open `path` read-write, creating it 0600: never through a symlink, only a regular
    file of this user, with group and other bits taken off. With `dir_fd` (an fd of
    `path`'s folder from `open_folder`), the file is opened in that very folder, whatever
    its path names by now. Returns the fd (the caller closes it)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        if dir_fd is None:
            fd = os.open(path, flags, 0o600)
        else:
            fd = os.open(path.name, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileUnsafe(
                f"{path} is a symlink; basehold never follows one (it must be a regular file "
                f"of this user, never a symlink). Remove it, and check who planted it, or "
                f"point {setting} elsewhere."
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise FileUnsafe(
            f"{path} is not a regular file owned by this user (uid {os.getuid()}); remove it "
            f"or point {setting} elsewhere."
        )
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def open_folder(folder: Path, setting: str, *, create: bool = True) -> int:
    """Create `folder` (0700) or find it, and check that it is a real directory of this
    user that no one else can write; `setting` names the knob that points at it (for the
    message). Returns an `O_DIRECTORY` fd of the very folder checked (the checks read the
    fd, not the path again): what is opened, created or renamed through it stays in that
    folder even if its path is swapped later. The caller closes it."""
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(folder, flags)
    except FileNotFoundError:
        raise FolderUnsafe(
            f"{folder} does not exist; create it (a folder only this user can write) or "
            f"point {setting} elsewhere."
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        raise FolderUnsafe(
            f"{folder} is not a directory (a symlink?); point {setting} at a real directory "
            "that only this user can write."
        ) from None
    try:
        _check_owned(folder, os.fstat(fd), setting)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owned(folder: Path, info: os.stat_result, setting: str) -> None:
    if info.st_uid != os.getuid():
        raise FolderUnsafe(
            f"{folder} belongs to uid {info.st_uid}, not to this user ({os.getuid()}): "
            f"whoever owns it could change what basehold trusts there. Remove it, or set "
            f"{setting} to a folder of your own."
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FolderUnsafe(
            f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): they "
            f"could change what basehold trusts there. `chmod go-w {folder}` or set {setting} "
            "to another folder."
        )


def check_private(folder: Path, setting: str, *, create: bool = True) -> None:
    """Create `folder` (0700) or check that it is a real directory of this user that no
    one else can write. `setting` names the knob that points at it (for the message)."""
    os.close(open_folder(folder, setting, create=create))


def check_parent(folder: Path, setting: str) -> None:
    """Someone who can write `folder`'s parent can rename `folder` away and put their own
    in its place after the checks: refuse a parent others can write, unless it has the
    sticky bit (like /tmp, where only the owner may rename an entry)."""
    parent = folder.resolve().parent
    info = parent.stat()
    shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if shared and not info.st_mode & stat.S_ISVTX:
        raise FolderUnsafe(
            f"{parent} (the parent of {folder}) is writable by others without the sticky "
            f"bit (mode {stat.S_IMODE(info.st_mode):o}): they could swap {folder} after "
            f"start. `chmod +t {parent}` or `chmod go-w {parent}`, or set {setting} to a "
            "path in a folder only you can write."
        )
