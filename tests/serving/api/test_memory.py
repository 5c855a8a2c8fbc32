"""/v1/memory: host figures from psutil, GPUs through the CUDA seam (faked: no GPU here)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from fastapi.testclient import TestClient

from service.common.cuda import CudaDeviceMemory
from service.serving.memory.nvml import GpuMemory, Nvml
from tests.conftest import ClientFactory, app_of, load


class FakeCuda:
    """Stands in for absent hardware only; everything above it is real."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.emptied = 0

    def device_count(self) -> int:
        return self.count

    def uuids(self) -> list[str]:
        return [f"GPU-fake-{i}" for i in range(self.count)]

    def memory(self, index: int) -> CudaDeviceMemory:
        return CudaDeviceMemory(
            index=index,
            name="Fake H100",
            total_bytes=80 << 30,
            free_bytes=70 << 30,
            allocated_bytes=9 << 30,
            reserved_bytes=10 << 30,
            uuid=f"GPU-fake-{index}",
        )

    def empty_cache(self) -> None:
        self.emptied += 1


def test_host_memory_and_models(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "gpt2"), dtype="float32")
    report = client.get("/v1/memory").json()
    assert report["devices"] == []
    host = report["host"]
    assert host["total_bytes"] == psutil.virtual_memory().total
    assert 0 < host["available_bytes"] <= host["total_bytes"]
    assert host["process_rss_bytes"] > 100 << 20
    assert host["held_bytes"] == status["memory"]["by_device"]["cpu"]
    assert report["models"] == [{"id": status["id"], "by_device": status["memory"]["by_device"]}]


class FakeNvml:
    def gpus(self) -> list[GpuMemory]:
        return [
            GpuMemory(
                index=i,
                name="NVIDIA H100 80GB HBM3",
                total_bytes=80 << 30,
                free_bytes=(60 - 10 * i) << 30,
                used_bytes=(20 + 10 * i) << 30,
                uuid=f"gpu-FAKE-{i}",  # NVML's prefix, another case: still the same GPU
            )
            for i in range(2)
        ]


def test_gpus_through_the_seams(make_client: ClientFactory) -> None:
    client = make_client()
    app_of(client).state.cuda = FakeCuda(2)
    app_of(client).state.gpus = FakeNvml()
    devices = client.get("/v1/memory").json()["devices"]
    assert [d["id"] for d in devices] == ["cuda:0", "cuda:1"]
    assert devices[0]["name"] == "NVIDIA H100 80GB HBM3"
    assert devices[0]["used_bytes"] == 20 << 30  # NVML: every process on the GPU
    assert devices[0]["free_bytes"] == 60 << 30
    assert devices[0]["torch_reserved_bytes"] == 10 << 30  # torch: this process
    assert devices[0]["torch_allocated_bytes"] == 9 << 30
    assert devices[0]["held_bytes"] == 0


class SecondGpuOnly(FakeCuda):
    """CUDA_VISIBLE_DEVICES=1: torch's cuda:0 is NVML's GPU 1."""

    def uuids(self) -> list[str]:
        return ["GPU-fake-1"]


def test_nvml_devices_are_matched_to_torch_by_uuid(make_client: ClientFactory) -> None:
    client = make_client()
    app_of(client).state.cuda = SecondGpuOnly(1)
    app_of(client).state.gpus = FakeNvml()
    devices = client.get("/v1/memory").json()["devices"]
    assert [d["id"] for d in devices] == ["cuda:0"]
    assert devices[0]["free_bytes"] == 50 << 30 and devices[0]["used_bytes"] == 30 << 30


def test_torch_only_without_nvml(make_client: ClientFactory) -> None:
    client = make_client()
    app_of(client).state.cuda = FakeCuda(1)
    devices = client.get("/v1/memory").json()["devices"]
    assert devices[0]["name"] == "Fake H100" and devices[0]["free_bytes"] == 70 << 30


def test_estimates_see_gpus_through_the_seam(
    tmp_path: Path, models_root: Path, socket_path: Path
) -> None:
    """Two (faked) GPUs with room: accelerate's auto map puts the model on the first; no
    direct torch.cuda question can say otherwise."""
    from service.serving.app import create_app
    from service.serving.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, cuda=FakeCuda(2), gpus=FakeNvml())
    with TestClient(app, base_url="http://localhost") as client:
        body = {"source": str(models_root / "llama"), "dtype": "float32"}
        estimated = client.post("/v1/estimate", json=body)
        assert estimated.status_code == 200, estimated.text
        assert set(estimated.json()["by_device"]) == {"cuda:0"}
        pinned = client.post("/v1/estimate", json={**body, "device_map": "cpu"}).json()
        assert set(pinned["by_device"]) == {"cpu"}


class NvmlLibrary:
    """Stands in for the pynvml bindings on a node of `count` GPUs (absent hardware) and
    counts what is asked of the driver; `Nvml` and everything above it are real."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.calls = 0
        self.listings = 0  # nvmlDeviceGetCount: one per listing of the GPUs

    def nvmlInit(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        self.calls += 1
        self.listings += 1
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.calls += 1
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(total=141 << 30, free=(100 - handle) << 30, used=(41 + handle) << 30)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self.calls += 1
        return b"NVIDIA H200"

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        self.calls += 1
        return f"GPU-{handle:08x}-0000-0000-0000-000000000000".encode()


def nvml_app(
    tmp_path: Path, socket_path: Path, monkeypatch: pytest.MonkeyPatch, count: int = 8
) -> tuple[TestClient, NvmlLibrary]:
    """An app whose GPUs (all visible) are NVML's: `count` of them, each question counted."""
    from service.serving.app import create_app
    from service.serving.settings import Settings

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    library = NvmlLibrary(count)
    settings = Settings(state_dir=tmp_path / "state", socket=socket_path)
    app = create_app(settings, gpus=Nvml(library))
    return TestClient(app, base_url="http://localhost"), library


def test_one_memory_report_lists_the_gpus_once(
    tmp_path: Path, socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, library = nvml_app(tmp_path, socket_path, monkeypatch)
    with client:
        library.calls = library.listings = 0
        devices = client.get("/v1/memory").json()["devices"]
        assert [d["id"] for d in devices] == [f"cuda:{i}" for i in range(8)]
        assert devices[7]["free_bytes"] == 93 << 30
        assert library.listings == 1, f"one report listed the GPUs {library.listings} times"
        assert library.calls == 1 + 4 * 8


class StuckNvml:
    """A GPU probe stuck in the driver until the test lets it go."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()

    def gpus(self) -> list[GpuMemory]:
        self.asked.set()
        assert self.release.wait(60), "the test never let the probe go"
        return []


def answers_while_a_probe_is_stuck(client: TestClient, path: str) -> None:
    """While `path` is stuck in a GPU probe, /healthz and /v1/models still answer."""
    stuck = StuckNvml()
    app_of(client).state.gpus = stuck
    answers: dict[str, int] = {}

    def ask(url: str) -> None:
        answers[url] = client.get(url).status_code

    probing = threading.Thread(target=ask, args=(path,), daemon=True)
    probing.start()
    try:
        assert stuck.asked.wait(30), f"{path} never probed the GPUs"
        for other in ("/healthz", "/v1/models"):
            answering = threading.Thread(target=ask, args=(other,), daemon=True)
            answering.start()
            answering.join(10)
            assert answers.get(other) == 200, f"{other} waited for {path}'s stuck GPU probe"
        assert path not in answers
    finally:
        stuck.release.set()
        probing.join(30)
    assert answers[path] == 200


def test_a_stuck_gpu_probe_blocks_no_other_request(client: TestClient) -> None:
    answers_while_a_probe_is_stuck(client, "/v1/memory")
