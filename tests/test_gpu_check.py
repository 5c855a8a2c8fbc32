"""bench/gpu_check.py cannot run here (no GPU), but its flow can: the CPU rehearsal runs the
same server, independent workers, logits, LoRA and checksum checks, so the script a GPU
machine runs is known to work up to the CUDA calls."""

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
    assert proc.stdout.count("PASS") == 18
    assert "| nf4 |" in proc.stdout and "| bf16 (float32 on CPU) |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_says_it_needs_a_gpu() -> None:
    script = ROOT / "bench" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT / "bench", capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
