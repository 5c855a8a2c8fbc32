"""gpu_check's first stages: versions and the driver; the loader template and gpu_check's
worker template stay CUDA-free (a process forked from one that initialized CUDA cannot
use it: every loader and worker would fail)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from common import ROOT
from gpu_check_runner import Deadline, Outcome
from gpu_check_worker import NVML_CHECK, Worker, cuda_state

TEMPLATE = Path(__file__).resolve().parent / "gpu_check_template.py"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(where: str) -> Any:
    def stage(_: dict[str, Any], deadline: Deadline) -> Outcome:
        import torch

        figures: dict[str, Any] = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            **{
                name: _version(name)
                for name in ("transformers", "peft", "bitsandbytes", "accelerate", "cuda-bindings")
            },
        }
        checks: dict[str, bool] = {}
        if where.startswith("cuda"):
            from service.common.handles.devices import CUDA

            props = torch.cuda.get_device_properties(0)
            figures["gpu"] = {
                "name": props.name,
                "uuid": f"GPU-{props.uuid}",
                "total_bytes": props.total_memory,
                "visible": torch.cuda.device_count(),
            }
            figures.update(_driver())
            reason = CUDA.unavailable()
            figures["segments_unavailable"] = reason
            checks["CUDA VMM segments can be made (cuda-bindings)"] = reason is None
            bindings, driver = figures.get("cuda-bindings"), figures.get("driver_cuda")
            if bindings and driver:
                checks["cuda-bindings' major is not newer than the driver's CUDA"] = int(
                    bindings.split(".")[0]
                ) <= int(driver.split(".")[0])
        else:
            figures["gpu"] = None  # a rehearsal: the host stand-in for device segments
        return Outcome(figures, checks)

    return stage


def _driver() -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        import pynvml

        pynvml.nvmlInit()
        found["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as exc:  # NVML is optional for handles; say so
        found["driver"] = f"unknown (NVML: {exc})"
    try:
        from cuda.bindings import driver

        driver.cuInit(0)
        _, version = driver.cuDriverGetVersion()
        found["driver_cuda"] = f"{int(version) // 1000}.{int(version) % 1000 // 10}"
    except Exception as exc:
        found["driver_cuda_error"] = str(exc)
    return found


def loader_template(_: dict[str, Any], deadline: Deadline) -> Outcome:
    """The real loader template with PYTORCH_NVML_BASED_CUDA_CHECK=1: its preload leaves
    CUDA uninitialized, and it starts serving."""
    env = {**os.environ, NVML_CHECK: "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="basehold-gpu-check-template-") as folder:
        address = Path(folder) / "template.sock"
        command = [sys.executable, str(TEMPLATE), "--listen", str(address), "--owned"]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        try:
            lines = _lines_until_ready(process, deadline)
        finally:
            assert process.stdin is not None and process.stderr is not None
            process.stdin.close()  # an owned template exits when its stdin closes
            try:
                process.wait(timeout=deadline.left(30))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            err = process.stderr.read()
    observed = json.loads(lines[0]) if lines and lines[0].startswith("{") else {}
    ready = "ready" in lines
    figures: dict[str, Any] = {**observed, "ready": ready}
    if not ready:
        figures["stderr"] = err.decode(errors="replace")[-2000:]
    return Outcome(
        figures,
        checks={
            "no preloaded module initialized CUDA": observed.get("initialized") is False,
            "the template started serving": ready,
        },
    )


def _lines_until_ready(process: subprocess.Popen[bytes], deadline: Deadline) -> list[str]:
    assert process.stdout is not None
    buffer = b""
    while b"ready\n" not in buffer:
        if not select.select([process.stdout], [], [], deadline.left())[0]:
            continue
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        buffer += chunk
    return buffer.decode(errors="replace").splitlines()


def worker_template(preload: list[str]) -> Any:
    """A worker forked from gpu_check's worker template (the forkserver) finds CUDA
    untouched, and peft and bitsandbytes not preloaded (they may initialize it)."""

    def stage(_: dict[str, Any], deadline: Deadline) -> Outcome:
        worker = Worker(cuda_state, preload)
        try:
            found = dict(worker.answer(deadline))
        finally:
            worker.kill()
        return Outcome(
            figures={**found, "not_preloaded": sorted(set(preload) - set(found["preloaded"]))},
            checks={
                "CUDA was not initialized before the fork": not found["initialized"]
                and not found["bad_fork"],
                "peft and bitsandbytes are imported after the fork": not found[
                    "peft_or_bitsandbytes_preloaded"
                ],
            },
        )

    return stage
