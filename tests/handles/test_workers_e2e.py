"""Handles end to end: a real uvicorn server and training workers as independent processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_server_e2e import ROOT, Server, start

pytestmark = pytest.mark.e2e


def shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path: Path, models_root: Path) -> Iterator[Server]:
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_LEASE_REAP_SECONDS": "0.2",
    }
    running = start(tmp_path, [], env=env)
    yield running
    running.stop()


def load(server: Server, **body: Any) -> dict[str, Any]:
    model_id = httpx.post(f"{server.url}/v1/models", json=body).json()["id"]
    while True:
        status: dict[str, Any] = httpx.get(f"{server.url}/v1/models/{model_id}").json()
        if status["state"] in ("ready", "failed"):
            assert status["state"] == "ready", status
            return status
        time.sleep(0.05)


def worker(server: Server, model_id: str, mode: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.handles.worker",
            server.url,
            model_id,
            mode,
            json.dumps(spec),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def arena_of(server: Server) -> str:
    files = list(server.shm.glob("*.safetensors"))
    assert len(files) == 1, files
    return str(files[0])


CASES = {
    "llama-fp32": (
        {"dtype": "float32"},
        "llama",
        {"auto_class": "AutoModelForCausalLM", "targets": ["q_proj", "v_proj"]},
    ),
    "llama-nf4-double-quant": (
        {
            "dtype": "float32",
            "quantization": {"method": "bnb-4bit", "quant_type": "nf4", "double_quant": True},
        },
        "llama",
        {"auto_class": "AutoModelForCausalLM", "targets": ["q_proj", "v_proj"]},
    ),
    "llama-tied": (
        {"dtype": "float32"},
        "llama-tied",
        {"auto_class": "AutoModelForCausalLM", "targets": ["q_proj"], "tied": True},
    ),
    "bert-seq-cls": (
        {"dtype": "float32", "task": "seq-cls"},
        "bert-cls",
        {"auto_class": "AutoModelForSequenceClassification", "targets": ["query", "value"]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attach_train_release_unload(server: Server, models_root: Path, case: str) -> None:
    load_spec, folder, extra = CASES[case]
    baseline = shm_used()
    source = str(models_root / folder)
    status = load(server, source=source, **load_spec)
    assert status["shareable"] is True, status
    arena = arena_of(server)
    before = sha256(arena)
    assert os.stat(arena).st_mode & 0o077 == 0  # not readable by group or others
    spec = {"source": source, **load_spec, **extra}
    proc = worker(server, status["id"], "train", spec)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["identical"], "worker logits differ from from_pretrained"
    assert result["adapter_changed"]
    assert result["outside_arena"] == []
    assert result["arena"] == arena
    assert result["leases_while_attached"] == 1
    if extra.get("tied"):
        assert result["tied"]
    assert sha256(arena) == before, "the base weights changed"
    assert httpx.get(f"{server.url}/v1/leases").json()["leases"] == []
    assert httpx.delete(f"{server.url}/v1/models/{status['id']}").status_code == 204
    assert not Path(arena).exists()
    assert shm_used() - baseline < 1 << 20


def test_sigkilled_worker_lease_expires(server: Server, models_root: Path) -> None:
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    proc = worker(server, status["id"], "hold", {"ttl": 1})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    assert httpx.get(f"{server.url}/v1/models/{status['id']}").json()["leases"] == 1
    time.sleep(2)  # renewals keep a live worker's lease
    assert httpx.get(f"{server.url}/v1/models/{status['id']}").json()["leases"] == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/v1/models/{status['id']}").json()["leases"]:
        assert time.monotonic() < deadline, "lease of a dead worker never expired"
        time.sleep(0.1)
    assert httpx.delete(f"{server.url}/v1/models/{status['id']}").status_code == 204
    assert "expired" in server.output()


def test_unload_is_refused_then_forced_and_worker_survives(
    server: Server, models_root: Path
) -> None:
    baseline = shm_used()
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    proc = worker(server, status["id"], "hold", {"ttl": 30})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    refused = httpx.delete(f"{server.url}/v1/models/{status['id']}")
    assert refused.status_code == 409 and refused.json()["code"] == "model_leased"
    forced = httpx.delete(f"{server.url}/v1/models/{status['id']}", params={"force": "true"})
    assert forced.status_code == 204
    assert list(server.shm.glob("*.safetensors")) == []
    # The arena is unlinked, but the worker still maps it and keeps working.
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    assert "forward_sum" in out
    assert shm_used() - baseline < 1 << 20


def test_write_in_worker_kills_only_the_worker(server: Server, models_root: Path) -> None:
    status = load(server, source=str(models_root / "llama"), dtype="float32")
    arena = arena_of(server)
    before = sha256(arena)
    proc = worker(server, status["id"], "write", {})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGSEGV
    assert "attached" in out and "wrote" not in out
    assert sha256(arena) == before
    assert httpx.get(f"{server.url}/healthz").status_code == 200
