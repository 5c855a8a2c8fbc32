"""Usable cores: the affinity mask and a cgroup CPU quota, read the way the kernel sets
them (a real cgroup where this machine lets us make one, the files of cgroup v2 in a
folder laid out like /sys/fs/cgroup where it does not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.common.cores import LoadParallelism, cgroup_quota, usable_cores

ROOT = Path(__file__).resolve().parents[2]
V1_CPU = Path("/sys/fs/cgroup/cpu")
PROBE = (
    "import json; from service.common.cores import cgroup_quota, usable_cores; "
    "print(json.dumps([cgroup_quota(), usable_cores()]))"
)


@contextmanager
def cpu_cgroup(quota_us: int, child_quota_us: int = -1) -> Iterator[Path]:
    """A cgroup v1 `cpu` folder with `quota_us` per 100 ms, and in it a child with its own
    (-1: none), removed afterwards; skips where this machine has no writable v1 cpu
    hierarchy."""
    if not (V1_CPU / "cpu.cfs_quota_us").is_file() or not os.access(V1_CPU, os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpu hierarchy (root on a v1 machine)")
    parent = V1_CPU / f"basehold-test-{uuid.uuid4().hex[:8]}"
    child = parent / "job"
    parent.mkdir()
    try:
        child.mkdir()
        (parent / "cpu.cfs_period_us").write_text("100000")
        (parent / "cpu.cfs_quota_us").write_text(str(quota_us))
        (child / "cpu.cfs_quota_us").write_text(str(child_quota_us))
        yield child
    finally:
        for folder in (child, parent):
            if folder.exists():
                folder.rmdir()


def probe_in(cgroup: Path) -> list[float | int | None]:
    """What a fresh process placed in `cgroup` reads (it moves itself before importing)."""
    code = f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid())); "
    out = subprocess.run(
        [sys.executable, "-c", code + PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result: list[float | int | None] = json.loads(out)
    return result


def test_a_quota_on_an_ancestor_cgroup_caps_the_cores() -> None:
    with cpu_cgroup(50_000) as child:  # half a CPU above, none on the process's own cgroup
        quota, cores = probe_in(child)
    assert quota == pytest.approx(0.5)
    assert cores == 1


def test_a_fractional_quota_rounds_up_and_never_exceeds_the_affinity() -> None:
    affinity = len(os.sched_getaffinity(0))
    with cpu_cgroup(400_000, child_quota_us=150_000) as child:
        quota, cores = probe_in(child)
    assert quota == pytest.approx(1.5)  # the tighter of 4 above and 1.5 here
    assert cores == min(affinity, 2)


def test_without_a_quota_the_affinity_mask_counts() -> None:
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " + PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("1]")
    assert usable_cores() <= len(os.sched_getaffinity(0))


def test_cgroup_v2_cpu_max_up_the_tree(tmp_path: Path) -> None:
    """cgroup v2 (unified): `cpu.max` on the process's cgroup and its ancestors."""
    root = tmp_path / "cgroup"
    leaf = root / "kubepods" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup-of-self"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    assert cgroup_quota(root, proc) == pytest.approx(2.5)
    # A container that sees only its own cgroup (cgroup namespace): the mount root.
    (root / "cpu.max").write_text("100000 100000\n")
    proc.write_text("0::/\n")
    assert cgroup_quota(root, proc) == pytest.approx(1.0)
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(root, proc) is None


def test_loads_and_threads_share_the_cores() -> None:
    assert LoadParallelism.of(2) == LoadParallelism(loads=1, threads=2)
    assert LoadParallelism.of(16) == LoadParallelism(loads=2, threads=8)
    assert LoadParallelism.of(128) == LoadParallelism(loads=4, threads=32)
    # Settings win; the threads follow the loads asked for.
    assert LoadParallelism.of(16, loads=4) == LoadParallelism(loads=4, threads=4)
    assert LoadParallelism.of(16, threads=3) == LoadParallelism(loads=2, threads=3)
