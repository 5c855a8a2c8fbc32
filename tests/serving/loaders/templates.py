"""A loader template a test starts for itself, forked from the worker zygote
(tests/zygote.py), which imported torch and transformers once: it answers in about a
second, where a cold `service.serving.loaders.template.start` spends ~6 s importing them
again.

It is the same program: the forker's entry point run as `python -m` runs it (the zygote's
`run_module`), with its own environment, `--listen ADDRESS --owned` (it exits when its
stdin closes). Where the zygote cannot serve the environment, it starts cold."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path
from typing import IO

from service.loader import forker
from tests.spawn import Process, run_module, worker_env


class ForkedTemplate:
    def __init__(self, process: Process) -> None:
        self.process = process
        self.output: list[str] = []  # what it wrote (its log), read as it comes

    def wait_preloaded(self, timeout: float = 120) -> None:
        """Until it logged the end of its background preload (BASEHOLD_LOADER_PRELOAD is
        imported once it serves: a module that changes what loaders do must be in first)."""
        deadline = time.monotonic() + timeout
        while not any("preloaded in the background" in line for line in self.output):
            assert time.monotonic() < deadline, "".join(self.output)[-3000:]
            time.sleep(0.05)

    def close(self) -> None:
        """Close its stdin (it exits, as an owned template does) and wait for it."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def _drain(stream: IO[str], into: list[str]) -> None:
    """Read a pipe to its end, so that the template never blocks on a full one."""
    for line in stream:
        into.append(line)


def start_template(address: Path, timeout: float = 120, **env: str) -> ForkedTemplate:
    """A template listening on `address` once this returns (its `ready` line read), with
    `env` added to this process's environment (e.g. BASEHOLD_LOADER_PRELOAD)."""
    # The workers' environment (their template) with what template.start adds.
    full_env = worker_env(THP_MEM_ALLOC_ENABLE="1", PYTORCH_NVML_BASED_CUDA_CHECK="1", **env)
    argv = ["--listen", str(address), "--owned"]
    process = run_module(forker.__name__, argv, env=full_env)
    template = ForkedTemplate(process)
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + timeout
    said = b""
    while b"ready\n" not in said:  # read as template.start does: raw, with a deadline
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            process.kill()
            raise AssertionError(f"the loader template did not start in {timeout:g} s")
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:  # it exited
            process.wait(timeout=30)
            raise AssertionError(f"the loader template exited: {process.stderr.read()[-3000:]}")
        said += chunk
    for stream in (process.stdout, process.stderr):
        threading.Thread(target=_drain, args=(stream, template.output), daemon=True).start()
    return template
