"""Whether the installed cuda-bindings can talk to this node's NVIDIA driver.

GPU models are lent as CUDA VMM fds through cuda-bindings (`service.common.handles.vmm`).
A cuda-bindings of a newer CUDA major than the driver supports (13.x on a CUDA 12 driver,
what `cuda-bindings>=12.6` resolves to today) fails inside the driver calls, so the loader
holds GPU models privately and the serving process reports the package to install. An
older major is fine: drivers run older CUDA versions. Imports neither torch nor CUDA
state: the serving process (no torch) asks too, and NVML is tried before the driver API.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

# What each CUDA major's extra pins (pyproject's gpu-cu12 / gpu-cu13).
_REQUIREMENTS = {12: ">=12.6,<13", 13: ">=13,<14"}


def installed_version() -> str | None:
    """The installed cuda-bindings version (None: not installed)."""
    try:
        return importlib.metadata.version("cuda-bindings")
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvml_cuda_version() -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: NVMLError_LibraryNotFound / DriverNotLoaded
        return None
    try:
        return int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def _cuda_driver_version() -> int | None:
    # cuDriverGetVersion needs no cuInit and makes no context (safe before a fork).
    try:
        from cuda.bindings import driver

        result: Any = driver.cuDriverGetVersion()
    except Exception:  # not installed, or no libcuda (cuda-pathfinder raises)
        return None
    status, version = result
    if status != driver.CUresult.CUDA_SUCCESS:
        return None
    return int(version)


def driver_cuda_version() -> int | None:
    """The CUDA version the driver supports as the driver encodes it (12040 is 12.4), or
    None where there is no driver."""
    version = _nvml_cuda_version()
    return version if version is not None else _cuda_driver_version()


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def compare(installed: str | None, driver_version: int | None) -> str | None:
    """The sentence saying which package to install when `installed` (a cuda-bindings
    version) is of a newer CUDA major than `driver_version` (cuDriverGetVersion's encoding),
    else None. Nothing installed or no driver: nothing to compare."""
    if installed is None or driver_version is None or driver_version <= 0:
        return None
    installed_major = _major(installed)
    driver_major, driver_minor = driver_version // 1000, (driver_version % 1000) // 10
    if installed_major is None or installed_major <= driver_major:
        return None
    requirement = _REQUIREMENTS.get(driver_major, f">={driver_major},<{driver_major + 1}")
    extra = f" (or the [gpu-cu{driver_major}] extra)" if driver_major in _REQUIREMENTS else ""
    return (
        f"cuda-bindings {installed} is installed but the NVIDIA driver supports CUDA "
        f"{driver_major}.{driver_minor}: `pip install 'cuda-bindings{requirement}'`{extra} "
        "to lend GPU models; until then they are held privately"
    )


@functools.cache
def mismatch() -> str | None:
    """Why this process's cuda-bindings cannot drive this node's GPUs (None: they can, or
    there is nothing to compare). Asked once per process."""
    return compare(installed_version(), driver_cuda_version())
