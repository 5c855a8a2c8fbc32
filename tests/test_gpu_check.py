"""bench/gpu_check.py cannot run here (no GPU), but its flow can: the CPU rehearsal runs the
preflight, the same server with the host stand-in for device segments (so placement,
publish, open, rebind, the forward guard and segment lifetimes all run), independent
workers, logits, LoRA, checksum and forced-unload checks: the script a GPU machine runs is
known to work up to the CUDA calls."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.test_server_e2e import ROOT

pytestmark = pytest.mark.e2e


def test_gpu_check_rehearsal_passes_every_check() -> None:
    script = ROOT / "bench" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--rehearse-on-cpu", "--tiny", "--steps", "3"],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 check(s) failed" in proc.stdout
    assert proc.stdout.count("PASS") == 4 * 11 + 5
    for row in ("| bf16 (float32) |", "| nf4 |", "| nf4-dq |", "| tied (float32) |"):
        assert row in proc.stdout
    # The segment's fd outlived the process that made it and opened in another PID
    # namespace (this suite runs as root), as on a GPU.
    assert (
        "1 MiB made by a process that exited, read back from its fd in another PID namespace"
        in proc.stdout
    )
    assert "PASS  forced unload: the worker's next forward raised LeaseLost" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_says_it_needs_a_gpu() -> None:
    script = ROOT / "bench" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT / "bench", capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
