"""The examples run as written, against a live server holding copies of the `--demo`
checkpoint (its own BPE tokenizer and generation config; 4-bit for the TRL QLoRA example),
and end as a scheduler expects (docs/jobs.md): a forced unload during training leaves a
resumable checkpoint and exits LEASE_LOST, never with a final adapter; a run with
--resume on a new lease continues from it and saves an adapter that pins its base; no
tokenizer exits CONFIG before training."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.demo import write_demo_checkpoint
from service.worker.exit_codes import CONFIG, LEASE_LOST
from tests.serving.test_server_e2e import ROOT, Server, start, wait_ready
from tests.spawn import Process, run_module, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NF4 = {"method": "bnb-4bit", "quant_type": "nf4", "compute_dtype": "float32"}
STEP_LINE = re.compile(r"^step (\d+): loss", re.M)


@dataclass
class Served:
    server: Server
    demo: Path
    models: Path

    def hold(self, name: str, **extra: Any) -> dict[str, Any]:
        """Load `name` from a copy of its own: the same spec under another name would be an
        alias of another test's model, and a forced DELETE of an alias drops only the name."""
        own = self.models / name
        if not own.exists():
            shutil.copytree(self.demo, own)
        body = {"source": str(own), "name": name, "dtype": "float32", **extra}
        httpx.post(f"{self.server.url}/v1/models", json=body).raise_for_status()
        status = wait_ready(self.server.url, name)
        assert status["state"] == "ready", status
        return status


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("examples")
    models = root / "models"
    demo = write_demo_checkpoint(models)  # what `basehold serve --demo` writes
    server = start(root, [], env={"BASEHOLD_MODEL_ROOTS": json.dumps([str(models)])})
    try:
        yield Served(server, demo, models)
    finally:
        server.stop()


def launch(example: str, url: str, cwd: Path, *args: str, cache: Path | None = None) -> Process:
    env = worker_env(BASEHOLD_CACHE=str(cache or cwd / "cache"))
    return run_module(str(ROOT / "examples" / example), ["--url", url, *args], env=env, cwd=cwd)


def ended(proc: Process, code: int) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-4000:]
    return out, err


def wait_leased(url: str, model_id: str, proc: Process) -> None:
    """Until the example holds a lease on `model_id` (it is attached: training starts)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the example ended ({proc.returncode}): {proc.communicate()}")
        leases = httpx.get(f"{url}/v1/leases").json()["leases"]
        if any(lease["model_id"] == model_id for lease in leases):
            return
        time.sleep(0.1)
    raise AssertionError(f"no lease on {model_id}")


def force_unload_during_training(served: Served, name: str, proc: Process, out: Path) -> int:
    """Force-unload `name` while `proc` trains on it: the example exits LEASE_LOST with
    one checkpoint in `out` and no final adapter. Returns the checkpoint's step."""
    url = served.server.url
    wait_leased(url, name, proc)
    forced = httpx.delete(f"{url}/v1/models/{name}", params={"force": "true"})
    assert forced.status_code == 204, forced.text
    _, err = ended(proc, LEASE_LOST)
    assert "lease lost (unloaded" in err and "--resume" in err
    checkpoints = [p.name for p in out.glob("checkpoint-*")]
    assert len(checkpoints) == 1, checkpoints
    assert not (out / "adapter_config.json").exists()  # nothing saved as if final
    assert not list(out.glob(".checkpoint-*")), "a partial checkpoint was left"
    return int(checkpoints[0].removeprefix("checkpoint-"))


def assert_pins_its_base(served: Served, name: str, adapter: Path) -> None:
    """The adapter names the base as the held model reports it: for a local checkpoint its
    directory (the load's source) and its resolved revision (none: not a hub load)."""
    status = httpx.get(f"{served.server.url}/v1/models/{name}").json()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == status["source"] == str(served.models / name)
    assert config["revision"] == status["resolved_revision"]


def test_train_lora_stops_with_a_checkpoint_and_resumes_on_a_new_lease(
    served: Served, tmp_path: Path
) -> None:
    url, out = served.server.url, tmp_path / "adapter"
    served.hold("lora-base")
    # --ttl 3: the renewer hears of the unload within a second (it renews every TTL/3).
    args = ["--model", "lora-base", "--ttl", "3"]
    proc = launch("train_lora.py", url, tmp_path, *args, "--steps", "100000")
    step = force_unload_during_training(served, "lora-base", proc, out)
    assert (out / f"checkpoint-{step}" / "optimizer.pt").is_file()

    served.hold("lora-base")  # the new lease's model: the same checkpoint, loaded again
    resumed = [*args, "--steps", str(step + 2), "--resume"]
    stdout, _ = ended(launch("train_lora.py", url, tmp_path, *resumed), 0)
    # The examples' default --out, relative to the job's folder.
    assert f"resuming from adapter/checkpoint-{step} at step {step}" in stdout
    assert [int(s) for s in STEP_LINE.findall(stdout)] == [step, step + 1]
    assert f"adapter saved to adapter after {step + 2} steps" in stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert_pins_its_base(served, "lora-base", out)


def test_sft_qlora_stops_with_a_checkpoint_and_resumes_on_a_new_lease(
    served: Served, tmp_path: Path
) -> None:
    url, out = served.server.url, tmp_path / "out"
    served.hold("llama-q4", quantization=NF4)
    args = ["--model", "llama-q4", "--ttl", "3"]
    proc = launch("sft_qlora.py", url, tmp_path, *args, "--max-steps", "100000")
    step = force_unload_during_training(served, "llama-q4", proc, out)
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step  # a Trainer checkpoint, resumable as it is

    served.hold("llama-q4", quantization=NF4)
    resumed = [*args, "--max-steps", str(step + 2), "--resume"]
    stdout, _ = ended(launch("sft_qlora.py", url, tmp_path, *resumed), 0)
    assert f"resuming from ./out/checkpoint-{step}" in stdout
    assert f"adapter saved to ./out after {step + 2} steps" in stdout
    assert_pins_its_base(served, "llama-q4", out)


@pytest.mark.parametrize("example", ["train_lora.py", "sft_qlora.py"])
def test_no_example_trains_without_the_models_tokenizer(
    served: Served, tmp_path: Path, example: str
) -> None:
    """An unwritable files cache (a path under a file: unwritable for root too) ends the
    job with CONFIG and a sentence naming BASEHOLD_CACHE and HOME, before it attaches."""
    served.hold("no-tokenizer")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    url = served.server.url
    proc = launch(example, url, tmp_path, "--model", "no-tokenizer", cache=blocker / "cache")
    stdout, err = ended(proc, CONFIG)
    assert "Refusing to train" in err and "BASEHOLD_CACHE" in err and "HOME" in err
    # Neither attached: train_lora prints its trainable parameters once it has, TRL logs.
    assert "trainable params" not in stdout and "loss" not in stdout
