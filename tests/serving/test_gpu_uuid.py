"""The serving side names GPUs by UUID (issue 26): a load spec may say `cuda:GPU-…` (as NVML
and `nvidia-smi -L` print it), resolved to the serving process's own index through NVML;
on a node without that GPU it is a 400 invalid_spec naming the GPU, not a schema error.
/readyz says which cuda-bindings to install when they do not match the driver."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.common.errors import InvalidSpec
from service.common.handles import bindings
from service.common.load.normalize import Devices, normalize
from service.common.load.spec import LoadRequest
from service.serving.api.gpu_sharing import bindings_mismatch
from service.serving.memory.nvml import Nvml
from service.serving.memory.visible import NvmlCuda
from tests.conftest import until, wait_for
from tests.serving.api.test_memory import NvmlLibrary

MISSING = "GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"


def nvml_uuid(index: int) -> str:
    """The UUID `NvmlLibrary` gives NVML's GPU `index`."""
    return f"GPU-{index:08x}-0000-0000-0000-000000000000"


@pytest.mark.parametrize(
    "body",
    [
        {"device_map": f"cuda:{MISSING}"},
        {"device_map": {"model": f"cuda:{MISSING}", "lm_head": "cpu"}},
        {"device_map": "auto", "max_memory": {f"cuda:{MISSING}": "1GiB", "cpu": "1GiB"}},
        {"device_map": "cuda:MIG-GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f/7/0"},
    ],
)
def test_a_gpu_this_node_lacks_is_a_400_naming_it(client: TestClient, body: dict[str, Any]) -> None:
    """This box has no GPU: the spec parses (no 422) and normalization says which GPU it
    cannot find."""
    answer = client.post("/v1/models", json={"source": "sshleifer/tiny-gpt2", **body})
    assert answer.status_code == 400, answer.text
    problem = answer.json()
    assert problem["code"] == "invalid_spec"
    assert "5c89852c-d268-c3f3-1b07-005d5ae1dc3f" in problem["detail"]
    assert "it sees no GPU" in problem["detail"]


def test_nvml_resolves_a_uuid_to_the_serving_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the NVML seam (a stand-in for the driver's bindings, `Nvml` real): NVML's GPU 1
    is the serving process's cuda:1 under CUDA_VISIBLE_DEVICES=3,1, and one spec whatever
    the GPU is called."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    devices = Devices.of(NvmlCuda(Nvml(NvmlLibrary(4))))
    assert devices.cuda_count == 2
    by_uuid = normalize(LoadRequest(source="m", device_map=f"cuda:{nvml_uuid(1)}"), devices)
    by_index = normalize(LoadRequest(source="m", device_map="cuda:1"), devices)
    assert by_uuid.device_map == "cuda:1"
    assert by_uuid.canonical() == by_index.canonical()
    # NVML's GPU 0 exists but this process does not see it: not found, the visible ones named
    hidden = LoadRequest(source="m", device_map=f"cuda:{nvml_uuid(0)}")
    with pytest.raises(InvalidSpec, match=f"cuda:0 = {nvml_uuid(3)}"):
        normalize(hidden, devices)


@pytest.fixture
def mismatched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """cuda-bindings 13 beside a CUDA 12.4 driver (absent hardware: the versions are given
    at the bindings module's seam; its comparison is real)."""
    monkeypatch.setattr(bindings, "installed_version", lambda: "13.0.1")
    monkeypatch.setattr(bindings, "driver_cuda_version", lambda: 12040)
    bindings.mismatch.cache_clear()
    bindings_mismatch.cache_clear()
    yield
    bindings.mismatch.cache_clear()
    bindings_mismatch.cache_clear()


def test_readyz_says_which_bindings_to_install(
    mismatched: None, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="basehold.gpu"):
        until(lambda: client.get("/readyz").status_code == 200, "/readyz never said ready")
        for _ in range(2):
            answer = client.get("/readyz")
            assert answer.status_code == 200  # still ready: GPU models are held privately
            body = answer.json()
            assert body["status"] == "ready"
            assert "cuda-bindings>=12.6,<13" in body["bindings"]
            assert "gpu-cu12" in body["bindings"]
    logged = [r for r in caplog.records if "GPU sharing is off" in r.getMessage()]
    assert len(logged) == 1, "the mismatch is logged once"


def test_readyz_says_nothing_when_the_bindings_match(client: TestClient) -> None:
    bindings_mismatch.cache_clear()
    until(lambda: client.get("/readyz").status_code == 200, "/readyz never said ready")
    assert client.get("/readyz").json() == {"status": "ready", "restoring": 0}


def test_a_load_naming_a_gpu_by_uuid_is_held_on_its_index(
    tmp_path: Path, socket_path: Path, models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP, the serving process's NVML view (a stand-in for the driver's bindings) turns
    the UUID into its own index; the UUID and the index are one model."""
    from service.serving.app import create_app
    from service.serving.settings import Settings

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, gpus=Nvml(NvmlLibrary(4)))
    body = {"source": str(models_root / "gpt2"), "dtype": "float32"}
    with TestClient(app, base_url="http://localhost") as client:
        first = client.post("/v1/models", json={**body, "device_map": f"cuda:{nvml_uuid(1)}"})
        assert first.status_code == 202, first.text
        assert first.json()["spec"]["device_map"] == "cuda:1"
        again = client.post("/v1/models", json={**body, "device_map": "cuda:1"})
        assert again.json()["id"] == first.json()["id"]
        # No GPU is really there: the load ends failed, in its own time.
        wait_for(client, first.json()["id"])
