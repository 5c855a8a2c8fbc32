"""Makes torch believe it runs on a machine with one GPU, for the fork-safety tests
(tests/loader/test_fork_safe.py); the fake stands in for the absent GPU only.

A test puts this folder first on a process's PYTHONPATH: the process (and all it forks)
then runs this at start. Here torch reports CUDA available with one device, and any CUDA
initialization (`torch.cuda._lazy_init`, behind `init`, `get_device_capability`,
`current_device`, `mem_get_info`, ...) behaves as on a GPU machine as far as fork
safety goes: the first in a process marks CUDA initialized there
(`torch.cuda.is_initialized()` is then true, as after a real one), and one in a process
forked from a process that initialized raises "Cannot re-initialize CUDA in forked
subprocess". Every initialization then raises all the same (there is no GPU to go on
with): bitsandbytes catches that and runs on its CPU backend, as it would anyway here.

Each initialization appends a JSON line to the file BH_TEST_CUDA_LOG names (when set):
the pid, its parent, `forked_from` (the pid that had initialized CUDA before this process
was forked from it, or null), and the innermost non-torch frames that asked for it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.cuda

_initialized_in: list[int] = []  # the pid that initialized CUDA (inherited by forks)
_real_lazy_init = torch.cuda._lazy_init
_real_is_initialized = torch.cuda.is_initialized


def _record(pid: int, forked_from: int | None) -> None:
    path = os.environ.get("BH_TEST_CUDA_LOG")
    if not path:
        return
    frames = [
        f"{frame.filename}:{frame.lineno}"
        for frame in traceback.extract_stack()[:-2]
        if "/torch/" not in frame.filename and frame.filename != __file__
    ]
    line = json.dumps(
        {"pid": pid, "ppid": os.getppid(), "forked_from": forked_from, "stack": frames[-6:]}
    )
    with open(path, "a") as log:
        log.write(line + "\n")


def _lazy_init() -> None:
    pid = os.getpid()
    if _initialized_in and _initialized_in[0] != pid:
        _record(pid, _initialized_in[0])
        raise RuntimeError(
            "Cannot re-initialize CUDA in forked subprocess. To use CUDA with "
            "multiprocessing, you must use the 'spawn' start method "
            f"(cuda_believer: CUDA was initialized in pid {_initialized_in[0]} before it forked)"
        )
    if not _initialized_in:
        _initialized_in.append(pid)
    _record(pid, None)
    raise RuntimeError(f"cuda_believer: CUDA initialized in pid {pid}; there is no GPU here")


def is_initialized() -> bool:
    return bool(_initialized_in) and _initialized_in[0] == os.getpid()


def _replace(name: str, real: Callable[..., Any], fake: Callable[..., Any]) -> None:
    """`name` in torch.cuda and in every torch module that imported it by name."""
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, name, None) is real:
            setattr(module, name, fake)


_replace("_lazy_init", _real_lazy_init, _lazy_init)
_replace("is_initialized", _real_is_initialized, is_initialized)
_replace("is_available", torch.cuda.is_available, lambda: True)
_replace("device_count", torch.cuda.device_count, lambda: 1)


def _raw_stream(device: int) -> int:
    _lazy_init()  # a stream is asked for of an initialized device only
    raise AssertionError("unreachable")


# What bitsandbytes' CUDA backend looks up at import (torch's CPU build lacks it).
torch._C._cuda_getCurrentRawStream = _raw_stream


class _InitializesOnImport:
    """BH_TEST_CUDA_ON_IMPORT names a module whose import initializes CUDA here, as some
    library's might on a real GPU machine (a module basehold preloads, for the test of the
    template starting again without it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            # The fake raises after marking CUDA initialized (there is no GPU to go on with).
            with contextlib.suppress(RuntimeError):
                torch.cuda.init()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("BH_TEST_CUDA_ON_IMPORT"):
    sys.meta_path.insert(0, _InitializesOnImport(os.environ["BH_TEST_CUDA_ON_IMPORT"]))
