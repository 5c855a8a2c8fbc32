"""How many CPU cores this process may use, and how loads share them.

`os.cpu_count()` counts the machine; a container limited to 2 CPUs on a 64-core node
(`resources.limits.cpu: 2`, a cgroup CPU quota) or pinned with `taskset`/cpusets (the
affinity mask) gets far less. Threads sized from the machine then queue for the quota and
each load runs slower than it would with fewer threads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(directory: Path) -> float | None:
    """`cpu.max` is "QUOTA PERIOD" or "max PERIOD" (no limit)."""
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    """`cpu.cfs_quota_us` is -1 without a limit."""
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _chain(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and its ancestors up to the mount (a limit anywhere above
    applies too). Where the path is not under the mount (a container that sees only its
    own cgroup, mounted at the root), the mount itself."""
    folder = mount / path.lstrip("/")
    if not folder.is_dir():
        return [mount]
    chain = [folder, *folder.parents]
    return [f for f in chain if f == mount or mount in f.parents]


def cgroup_quota(root: Path = CGROUP_ROOT, proc: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, in CPUs (1.5 is
    a CPU and a half); None without one. cgroup v2 (`cpu.max`) and v1
    (`cpu.cfs_quota_us`)."""
    lines = (_read(proc) or "").splitlines()
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and (root / "cgroup.controllers").is_file():  # v2, unified
            quotas += [q for f in _chain(root, path) if (q := _v2_quota(f)) is not None]
        elif "cpu" in controllers.split(","):  # v1: cpu, or cpu,cpuacct
            mount = root / controllers
            if not mount.is_dir():
                mount = root / "cpu"
            quotas += [q for f in _chain(mount, path) if (q := _v1_quota(f)) is not None]
    return min(quotas) if quotas else None


def usable_cores() -> int:
    """The CPUs this process may run on (affinity), capped by its cgroup quota rounded up."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


@dataclass(frozen=True)
class LoadParallelism:
    """Loads at once, and torch threads in each: together about the usable cores, so that
    loads running side by side do not slow each other down."""

    loads: int
    threads: int

    @classmethod
    def of(
        cls, cores: int, loads: int | None = None, threads: int | None = None
    ) -> LoadParallelism:
        """Defaults: one load per 8 cores (1 to 4 at once), each with its share of the
        cores. A load is mostly one process's CPU work (reading, casting, quantizing); with
        more loads than that they only take turns on the same cores."""
        loads = loads or max(1, min(4, cores // 8))
        return cls(loads=loads, threads=threads or max(1, cores // loads))
