"""bench/gpu_check.py cannot run here (no GPU), but its flow can: the CPU rehearsal runs the
preflight, the same server with the host stand-in for device segments (so placement,
publish, open, rebind, the forward guard and segment lifetimes all run), independent
workers, logits, LoRA, checksum and forced-unload checks: the script a GPU machine runs is
known to work up to the CUDA calls."""

from __future__ import annotations

import pytest
import torch

from tests.serving.test_server_e2e import ROOT
from tests.spawn import run_module

pytestmark = pytest.mark.e2e


def run_script(*args: str) -> tuple[int, str, str]:
    """`python bench/gpu_check.py ARGS` in bench/, forked from the workers' template (it
    imported torch, transformers, peft and bitsandbytes, which the script's main process
    would import again): its exit code, stdout and stderr."""
    proc = run_module(str(ROOT / "bench" / "gpu_check.py"), list(args), cwd=ROOT / "bench")
    out, err = proc.communicate(timeout=600)
    return proc.wait(), out, err


def test_gpu_check_rehearsal_passes_every_check() -> None:
    code, stdout, stderr = run_script("--rehearse-on-cpu", "--tiny", "--steps", "3")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "0 check(s) failed" in stdout
    assert stdout.count("PASS") == 4 * 11 + 5
    for row in ("| bf16 (float32) |", "| nf4 |", "| nf4-dq |", "| tied (float32) |"):
        assert row in stdout
    # The segment's fd outlived the process that made it and opened in another PID
    # namespace (this suite runs as root), as on a GPU.
    assert (
        "1 MiB made by a process that exited, read back from its fd in another PID namespace"
        in stdout
    )
    assert "PASS  forced unload: the worker's next forward raised LeaseLost" in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_says_it_needs_a_gpu() -> None:
    code, _, stderr = run_script()
    assert code == 2
    assert "needs a CUDA GPU" in stderr
