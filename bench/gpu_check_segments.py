"""gpu_check's segment stages: a process makes a device segment and exits; this process
(standing in for the service) keeps only its fd; workers import it as this uid, as
another uid and in another PID namespace, read-only; the memory goes with the last fd.

On a GPU these are CUDA VMM allocations (service.common.handles.devices.CUDA) and memory
is read from the device; in a rehearsal, the host stand-in's memfds, and "freed" means no
process holds an fd or a mapping of the memfd any more.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from gpu_check_runner import Deadline, Outcome, Skip
from gpu_check_worker import Worker, devices_for, digest, export_segment
from gpu_check_worker import import_segment as import_in_worker
from gpu_check_worker import read_only_segment as read_only_in_worker

MiB = 2**20


def device_used(where: str) -> int:
    """Bytes in use on the GPU, every process's (0 in a rehearsal)."""
    if not where.startswith("cuda"):
        return 0
    import torch

    torch.cuda.synchronize(where)
    free, total = torch.cuda.mem_get_info(where)
    return int(total - free)


@dataclass
class Exported:
    """The segment this process holds by its fd alone, as the service holds a model's."""

    where: str
    size: int
    fd: int
    described: str
    expected: str
    baseline: int  # GPU bytes in use before it was made (this process's context included)
    inode: int
    opened: list[Any] = field(default_factory=list)  # this process's own mappings of it


def vmm_export(where: str) -> Any:
    def stage(_: dict[str, Any], deadline: Deadline) -> Outcome:
        size = 64 * MiB if where.startswith("cuda") else 4 * MiB
        if where.startswith("cuda"):
            import torch

            torch.zeros(1, device=where)  # this process's context is part of the baseline
        baseline = device_used(where)
        began = time.perf_counter()
        exporter = Worker(export_segment, where, size)
        said = exporter.expect("segment", deadline)
        fd = reduction.recv_handle(exporter.conn)
        try:
            expected = str(exporter.answer(deadline))
        except BaseException:
            os.close(fd)
            raise
        exporter.process.join(deadline.left(30))
        exported = Exported(where, size, fd, said, expected, baseline, os.fstat(fd).st_ino)
        return Outcome(
            figures={"size_bytes": size, "export_s": time.perf_counter() - began},
            checks={"the exporting process exited": exporter.process.exitcode == 0},
            product=exported,
        )

    return stage


def survives_loader_exit(stage_input: dict[str, Any], deadline: Deadline) -> Outcome:
    """The loader exited; this process holds only the fd: the memory is still there (on a
    GPU: in use, and its bytes read back here)."""
    exported: Exported = stage_input["vmm-export"]
    held = device_used(exported.where) - exported.baseline
    from service.common.handles.descriptor import DeviceSegment

    described = DeviceSegment.model_validate_json(exported.described)
    segment = devices_for(exported.where).open(described, exported.fd)
    exported.opened.append(segment)
    checks = {
        "its bytes read back from the fd alone": digest(segment, exported.size) == exported.expected
    }
    if exported.where.startswith("cuda"):
        checks["the GPU still holds it"] = held >= exported.size
    return Outcome(figures={"held_bytes": held}, checks=checks)


def import_as(mode: str) -> Any:
    def stage(stage_input: dict[str, Any], deadline: Deadline) -> Outcome:
        exported: Exported = stage_input["vmm-export"]
        worker = Worker(import_in_worker, exported.where, exported.described, exported.size, mode)
        worker.send_fd(exported.fd)
        found = dict(worker.answer(deadline))
        if "skipped" in found:
            raise Skip(found["skipped"])
        if "error" in found:
            raise RuntimeError(found["error"])
        checks = {"its bytes read back": found.get("digest") == exported.expected}
        if mode == "other-uid":
            checks["read as another uid"] = found.get("uid") not in (None, os.geteuid())
        if mode == "pid-namespace":
            checks["read as pid 1 of a new PID namespace"] = found.get("pid") == 1
        return Outcome(figures={k: v for k, v in found.items() if k != "digest"}, checks=checks)

    return stage


def read_only(stage_input: dict[str, Any], deadline: Deadline) -> Outcome:
    """A worker maps the segment read-only and tries a write; the bytes stay as they were."""
    from gpu_check_worker import WorkerDied

    exported: Exported = stage_input["vmm-export"]
    worker = Worker(read_only_in_worker, exported.where, exported.described, exported.size)
    worker.send_fd(exported.fd)
    mapped = worker.expect("mapped", deadline)
    try:
        found = dict(worker.answer(deadline))
    except WorkerDied as died:  # a refused write on the CPU is a SIGSEGV
        found = {"write": "refused", "error": str(died)}
    finally:
        worker.kill()
    from service.common.handles.descriptor import DeviceSegment

    described = DeviceSegment.model_validate_json(exported.described)
    after = digest(devices_for(exported.where).open(described, exported.fd), exported.size)
    gc.collect()
    return Outcome(
        figures={"read_only": mapped["read_only"], **found},
        checks={
            "the mapping is read-only": mapped["read_only"] is True,
            "it reads the segment's bytes": mapped["digest"] == exported.expected,
            "a write was refused": found["write"] == "refused",
            "the segment's bytes are unchanged": after == exported.expected,
        },
    )


def freed_after_last_fd(stage_input: dict[str, Any], deadline: Deadline) -> Outcome:
    """Drop this process's mappings and close the last fd: the memory is freed (GPU bytes
    back to the baseline; no process holds an fd or a mapping of the stand-in's memfd)."""
    exported: Exported = stage_input["vmm-export"]
    exported.opened.clear()
    gc.collect()
    before = device_used(exported.where) - exported.baseline
    os.close(exported.fd)
    end = time.monotonic() + deadline.left(20)
    while True:
        now = device_used(exported.where) - exported.baseline
        holders = [] if exported.where.startswith("cuda") else holders_of(exported.inode)
        freed = now < exported.size if exported.where.startswith("cuda") else not holders
        if freed or time.monotonic() >= end:
            break
        time.sleep(0.05)
    return Outcome(
        figures={"held_before_bytes": before, "held_after_bytes": now, "holders": holders},
        checks={"the memory was freed after the last fd closed": freed},
    )


def holders_of(inode: int) -> list[str]:
    """Processes that hold a memfd with this inode open or mapped ("pid:fd" / "pid:map")."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("/memfd:") and os.stat(fd).st_ino == inode:
                    found.append(f"{proc.name}:fd")
            for line in (proc / "maps").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/memfd:") and int(parts[4]) == inode:
                    found.append(f"{proc.name}:map")
        except (OSError, ValueError):
            continue
    return sorted(set(found))
