"""Start a worker module (tests/worker/worker.py, hf_worker.py) as a process of its own:
a fork of the pre-imported worker template (tests/zygote.py), which never saw the server
or its memory, or a cold `python -m` where the environment needs one."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.zygote import Forked, Zygote, worker_template

ROOT = Path(__file__).resolve().parents[1]


_HF_HOME: list[Path] = []  # the session's workers' HF_HOME, made on first use


def _hf_home() -> Path:
    if not _HF_HOME:
        _HF_HOME.append(Path(tempfile.mkdtemp(prefix="bh-worker-hf-home-")))
        atexit.register(shutil.rmtree, _HF_HOME[0], ignore_errors=True)
    return _HF_HOME[0]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker with nothing of the server's: its own HF_HOME (one for
    the session's workers, as it is read at import: every worker forks from one template)
    and the given extras (its own BASEHOLD_CACHE, ...)."""
    env = {**os.environ, "HF_HOME": str(_hf_home()), "PYTHONPATH": str(ROOT), **extra}
    env.pop("HF_HUB_CACHE", None)
    return env


Process = Forked | subprocess.Popen[str]


def run_module(
    module: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    quiet: bool = False,
    template: Zygote | None = None,
) -> Process:
    """`python -m MODULE ARGV` (`python MODULE ARGV` for a .py path) with text pipes
    (`quiet`: output discarded), forked from `template` (default: the worker template for
    `env`, by default `worker_env()`: one template for every worker of the session)."""
    env = worker_env() if env is None else env
    template = template or worker_template(env)
    forked = None if template is None else template.run_module(module, argv, env, cwd, quiet)
    if forked is not None:
        return forked
    output = subprocess.DEVNULL if quiet else subprocess.PIPE
    command = [module] if module.endswith(".py") else ["-m", module]
    return subprocess.Popen(
        [sys.executable, *command, *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=output,
        stderr=output,
        text=True,
    )


def spawn_worker(
    url: str, model_id: str, mode: str, spec: dict[str, Any], *, quiet: bool = False
) -> Process:
    """tests/worker/worker.py (`quiet`: discard its output; storms start many)."""
    return run_module("tests.worker.worker", [url, model_id, mode, json.dumps(spec)], quiet=quiet)


def run_basehold(
    argv: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGV` to its end, forked from the pre-imported server template
    (cold where the environment needs it), as `subprocess.run(..., capture_output=True)`
    would answer."""
    from tests.zygote import ZYGOTE

    process = run_module("service", argv, env=env, cwd=ROOT, template=ZYGOTE)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, process.wait(), out, err)
