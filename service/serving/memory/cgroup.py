"""The memory limit of the cgroup this process runs in (a container's limit), v2 or v1.

Arenas are memfds: their pages are charged to the serving process's cgroup, so the limit
that matters for a load is the tightest one over this cgroup and its ancestors, less what
each already uses. "Uses" is the working set, as the kubelet counts it: usage less the
inactive file cache the kernel reclaims before it would OOM-kill anything.

Where the hierarchy is mounted comes from /proc/self/mountinfo (a container with its own
cgroup namespace sees its cgroup as "/", a host process sees the whole path), which
cgroup from /proc/self/cgroup. No limit anywhere (or no cgroup filesystem): None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 spells "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB
# pages); anything this large is no limit.
_UNLIMITED_V1 = 1 << 62


@dataclass(frozen=True)
class CgroupMemory:
    """The limiting cgroup: its limit and working set, and which file set that limit."""

    limit_bytes: int
    usage_bytes: int
    path: str  # the cgroup, as /proc/self/cgroup names it (e.g. /kubepods/pod…/…)
    setting: str  # memory.max (v2) or memory.limit_in_bytes (v1)

    @property
    def available_bytes(self) -> int:
        return max(self.limit_bytes - self.usage_bytes, 0)

    def describe(self) -> str:
        gib = 2**30
        return (
            f"the container's memory limit is {self.limit_bytes / gib:.2f} GiB ({self.setting} "
            f"of cgroup {self.path}), {self.usage_bytes / gib:.2f} GiB of it in use"
        )


@dataclass(frozen=True)
class Hierarchy:
    directory: Path  # where this process's cgroup is mounted
    mount_point: Path
    path: str
    version: int


def hierarchy(proc: Path = Path("/proc/self")) -> Hierarchy | None:
    """The memory hierarchy (v1 memory controller, else v2) and this process's place in it."""
    try:
        memberships = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    paths: dict[str, str] = {}  # "memory" (v1) or "" (v2) -> this process's cgroup path
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths.setdefault(controller, path)
    for line in mounts:
        fields = line.split()
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        kind, options = fields[separator + 1], fields[separator + 3].split(",")
        if kind == "cgroup" and "memory" in options and "memory" in paths:
            version, path = 1, paths["memory"]
        elif kind == "cgroup2" and "" in paths and "memory" not in paths:
            version, path = 2, paths[""]
        else:
            continue
        inside = Path(path).relative_to(root) if path.startswith(root) else Path(".")
        directory = Path(mount_point) / inside
        return Hierarchy(directory, Path(mount_point), path, version)
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _inactive_file(directory: Path, version: int) -> int:
    key = "inactive_file" if version == 2 else "total_inactive_file"
    try:
        lines = (directory / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def cgroup_memory(proc: Path = Path("/proc/self")) -> CgroupMemory | None:
    """The tightest memory limit over this process's cgroup and its ancestors (the one
    with the least room left), or None where nothing limits it."""
    found = hierarchy(proc)
    if found is None:
        return None
    limit_file = "memory.max" if found.version == 2 else "memory.limit_in_bytes"
    usage_file = "memory.current" if found.version == 2 else "memory.usage_in_bytes"
    tightest: CgroupMemory | None = None
    directory, path = found.directory, Path(found.path)
    while True:
        limit = _read_int(directory / limit_file)
        usage = _read_int(directory / usage_file)
        if limit is not None and limit < _UNLIMITED_V1 and usage is not None:
            working_set = max(usage - _inactive_file(directory, found.version), 0)
            candidate = CgroupMemory(limit, working_set, str(path), limit_file)
            if tightest is None or candidate.available_bytes < tightest.available_bytes:
                tightest = candidate
        if directory == found.mount_point or directory.parent == directory:
            return tightest
        directory, path = directory.parent, path.parent
