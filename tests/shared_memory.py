"""The shared memory a service holds, seen from outside it as a same-user process can.

The kernel's `Shmem` (/proc/meminfo) counts the memfds, tmpfs files and shared mappings of
every process on the machine: a test that compares it fails whenever anything else takes
or frees shared memory meanwhile. Here only the service's own processes count: the
serving process and its descendants, and the loader template it forks loaders from (its
own child, or the shared one named by BASEHOLD_LOADER_TEMPLATE) with its loaders. Each
object on a shmem filesystem (a memfd, a /dev/shm or other tmpfs file, SysV or shared
anonymous memory) that one of them keeps open or mapped counts once, at the bytes it has
allocated, however many fds and mappings in however many processes reach it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

Key = tuple[int, int]  # (st_dev, st_ino): one shared-memory object, wherever it is reached
MiB = 1 << 20


@dataclass(frozen=True)
class SharedObject:
    name: str  # as /proc shows it: "/memfd:basehold:... (deleted)", "/dev/shm/x", ...
    size: int  # bytes allocated; its mapped extent when no fd reaches it (see _mappings)


def shmem_devices() -> frozenset[int]:
    """The st_dev of every shmem filesystem: the kernel's internal one (memfds, SysV and
    shared anonymous memory) and each tmpfs mount."""
    probe = os.memfd_create("basehold-probe", os.MFD_CLOEXEC)
    try:
        devices = {os.fstat(probe).st_dev}
    finally:
        os.close(probe)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "tmpfs":
            major, minor = fields[2].split(":")
            devices.add(os.makedev(int(major), int(minor)))
    return frozenset(devices)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (none if it is gone)."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def serving(address: str) -> list[int]:
    """The processes that serve the Unix socket at `address` (its listener and accepted
    connections carry its name; a client's end has none)."""
    return sorted({c.pid for c in psutil.net_connections("unix") if c.laddr == address and c.pid})


def service_processes(pid: int, template: str | None = None) -> list[int]:
    """The serving process `pid` with its descendants, and the loader template serving
    `template` (default: this process's BASEHOLD_LOADER_TEMPLATE, which the services the
    tests start inherit) with its loaders."""
    template = template or os.environ.get("BASEHOLD_LOADER_TEMPLATE")
    roots = [pid, *(serving(template) if template else [])]
    return sorted({each for root in roots for each in tree(root)})


def _fds(pid: int, devices: frozenset[int]) -> Iterator[tuple[Key, SharedObject]]:
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            name = os.readlink(entry.path)
            info = os.stat(entry.path)
        except (FileNotFoundError, PermissionError):
            continue  # closed meanwhile, or not ours to look at
        if info.st_dev in devices and stat.S_ISREG(info.st_mode):
            yield (info.st_dev, info.st_ino), SharedObject(name, info.st_blocks * 512)


def _mappings(pid: int, devices: frozenset[int]) -> Iterator[tuple[Key, SharedObject]]:
    """Each shared-memory mapping at the extent it reaches into its object (statting the
    object through /proc/<pid>/map_files would need CAP_SYS_ADMIN)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0":
            continue  # anonymous private memory
        span, _, offset, device, inode, name = fields
        major, minor = device.split(":")
        dev = os.makedev(int(major, 16), int(minor, 16))
        if dev in devices:
            start, end = (int(part, 16) for part in span.split("-"))
            yield (dev, int(inode)), SharedObject(name, int(offset, 16) + end - start)


def shared_objects(
    pids: Iterable[int], devices: frozenset[int] | None = None
) -> dict[Key, SharedObject]:
    """Every shared-memory object the processes `pids` keep open or mapped, once each."""
    devices = devices or shmem_devices()
    opened: dict[Key, SharedObject] = {}
    mapped: dict[Key, SharedObject] = {}
    for pid in pids:
        try:
            opened.update(_fds(pid, devices))
            for key, found in _mappings(pid, devices):
                if key not in mapped or found.size > mapped[key].size:
                    mapped[key] = found
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # it exited meanwhile (or is not ours)
    return {**mapped, **opened}  # an fd tells the bytes allocated: it wins


def held_shared_memory(pid: int) -> int:
    """The bytes of shared memory the service whose serving process is `pid` holds."""
    return sum(found.size for found in shared_objects(service_processes(pid)).values())


def describe(pid: int) -> str:
    """What the service holds, one object a line (for assertion messages)."""
    held = shared_objects(service_processes(pid)).values()
    return "\n".join(f"{found.size / MiB:9.1f} MiB  {found.name}" for found in held)


def holders(key: Key) -> list[int]:
    """Every process on the machine (that this user may look at) holding the object."""
    devices = shmem_devices()
    return [pid for pid in psutil.pids() if key in shared_objects([pid], devices)]


# A process that allocates shared memory and holds it until its stdin closes. Each
# argument is HOW:WHERE:BYTES, WHERE "memfd" or a new file's path (in /dev/shm), HOW one
# of: fd (keep the fd), mapped (map it, close the fd), twice (two fds and a mapping),
# child (a forked child keeps the fd, the parent closes its own).
HOLDER = r"""
import mmap, os, sys
kept = []
for spec in sys.argv[1:]:
    how, where, size = spec.split(":")
    if where == "memfd":
        fd = os.memfd_create("holder")
    else:
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.posix_fallocate(fd, 0, int(size))
    if how in ("mapped", "twice"):
        kept.append(mmap.mmap(fd, int(size)))
    if how == "twice":
        kept.append(os.dup(fd))
    if how == "child" and os.fork() == 0:
        sys.stdin.read()
        os._exit(0)
    if how in ("mapped", "child"):
        os.close(fd)
print("ready", flush=True)
sys.stdin.read()
while True:
    try:
        os.wait()  # the children (they read the same stdin)
    except ChildProcessError:
        break
"""


@contextmanager
def holding(*specs: str) -> Iterator[subprocess.Popen[str]]:
    """A process (a child of this one) holding the shared memory `specs` describe (see
    HOLDER), from when it has allocated all of it until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *specs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline().strip() == "ready", "the holder failed to allocate"
        yield process
    finally:
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()
        for spec in specs:
            where = spec.split(":")[1]
            if where != "memfd":
                Path(where).unlink(missing_ok=True)
