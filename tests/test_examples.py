"""The examples run as written, against a live server holding the `--demo` checkpoint (its
own BPE tokenizer and generation config; 4-bit for the TRL QLoRA example)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.demo import write_demo_checkpoint
from tests.serving.test_server_e2e import ROOT, start, wait_ready
from tests.spawn import run_module, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run(example: str, url: str, cwd: Path, *args: str) -> str:
    env = worker_env(BASEHOLD_CACHE=str(cwd / "cache"))
    proc = run_module(str(ROOT / "examples" / example), ["--url", url, *args], env=env, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out


def test_examples_train_and_save(tmp_path: Path) -> None:
    models = tmp_path / "models"
    demo = write_demo_checkpoint(models)  # what `basehold serve --demo` writes
    server = start(tmp_path, [], env={"BASEHOLD_MODEL_ROOTS": json.dumps([str(models)])})
    try:
        nf4 = {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": "float32"}
        for name, extra in (("llama-q4", {"quantization": nf4}), ("demo", {})):
            body = {"source": str(demo), "name": name, "dtype": "float32", **extra}
            httpx.post(f"{server.url}/v1/models", json=body).raise_for_status()
            assert wait_ready(server.url, name)["state"] == "ready"
        work = tmp_path / "work"
        work.mkdir()
        out = run("sft_qlora.py", server.url, work, "--model", "llama-q4", "--max-steps", "2")
        assert "adapter saved" in out
        config = json.loads((work / "out" / "adapter_config.json").read_text())
        # A local load: the adapter names the checkpoint's directory.
        assert config["base_model_name_or_path"] == str(demo)
        out = run("train_lora.py", server.url, work, "--model", "demo", "--steps", "2")
        assert "step 1: loss" in out and "random tokens" not in out
        assert (work / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        server.stop()
