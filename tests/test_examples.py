"""The examples run as written, against a live server holding a tiny checkpoint with a real
tokenizer (4-bit for the TRL QLoRA example)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import checkpoints
from tests.conftest import MINILM
from tests.test_server_e2e import ROOT, start, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run(example: str, url: str, cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), "--url", url, *args],
        cwd=cwd,
        env={**os.environ, "HF_HOME": str(cwd / "hf"), "BASEHOLD_CACHE": str(cwd / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_examples_train_and_save(tmp_path: Path) -> None:
    models = tmp_path / "models"
    checkpoints.llama_with_tokenizer(models / "tok", MINILM)
    server = start(tmp_path, [], env={"BASEHOLD_MODEL_ROOTS": json.dumps([str(models)])})
    try:
        nf4 = {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": "float32"}
        for name, extra in (("llama-q4", {"quantization": nf4}), ("demo", {})):
            body = {"source": str(models / "tok"), "name": name, "dtype": "float32", **extra}
            httpx.post(f"{server.url}/v1/models", json=body).raise_for_status()
            assert wait_ready(server.url, name)["state"] == "ready"
        work = tmp_path / "work"
        work.mkdir()
        out = run("sft_qlora.py", server.url, work, "--model", "llama-q4", "--max-steps", "2")
        assert "adapter saved" in out
        config = json.loads((work / "out" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "llama-q4"  # a local load: its model id
        out = run("train_lora.py", server.url, work, "--model", "demo", "--steps", "2")
        assert "step 1: loss" in out and "random tokens" not in out
        assert (work / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        server.stop()
