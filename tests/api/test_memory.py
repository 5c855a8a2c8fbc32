"""/v1/memory: host figures from psutil, GPUs through the CUDA seam (faked: no GPU here)."""

from __future__ import annotations

from pathlib import Path

import psutil
from fastapi.testclient import TestClient

from service.memory.cuda import CudaDeviceMemory
from service.memory.nvml import GpuMemory
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
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, cuda=FakeCuda(2), gpus=FakeNvml())
    with TestClient(app, base_url="http://localhost") as client:
        body = {"source": str(models_root / "llama"), "dtype": "float32"}
        estimated = client.post("/v1/estimate", json=body)
        assert estimated.status_code == 200, estimated.text
        assert set(estimated.json()["by_device"]) == {"cuda:0"}
        pinned = client.post("/v1/estimate", json={**body, "device_map": "cpu"}).json()
        assert set(pinned["by_device"]) == {"cpu"}
