"""Unload gives the memory back: repeated load/unload of a ~100M-parameter model."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch
from fastapi.testclient import TestClient

from tests import checkpoints
from tests.conftest import ClientFactory, load

MiB = 1 << 20


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    checkpoints.llama_100m(root / "llama-100m")
    return root


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.slow
def test_repeated_load_unload_returns_rss(make_client: ClientFactory, big_root: Path) -> None:
    client: TestClient = make_client(model_roots=[big_root])
    source = str(big_root / "llama-100m")
    # Warm-up cycle: first use of transformers/torch code paths allocates for good.
    first = load(client, source=source, dtype="float32")
    footprint = first["memory"]["footprint_bytes"]
    assert footprint > 300 * MiB
    assert client.delete(f"/v1/models/{first['id']}").status_code == 204
    baseline = rss()
    peaks = []
    for _ in range(4):
        status = load(client, source=source, dtype="float32")
        assert status["state"] == "ready"
        peaks.append(rss())
        assert client.delete(f"/v1/models/{status['id']}").status_code == 204
    after = rss()
    assert min(peaks) - baseline > footprint * 0.8, "the model did not occupy memory"
    assert after - baseline < 64 * MiB, f"RSS grew by {(after - baseline) / MiB:.0f} MiB"
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        assert torch.cuda.memory_allocated() == 0


@pytest.mark.slow
def test_cancel_during_load_leaves_nothing(make_client: ClientFactory, big_root: Path) -> None:
    client: TestClient = make_client(model_roots=[big_root])
    source = str(big_root / "llama-100m")
    warm = load(client, source=source, dtype="bfloat16")
    client.delete(f"/v1/models/{warm['id']}")
    baseline = rss()
    response = client.post(
        "/v1/models",
        json={"source": source, "dtype": "float32", "quantization": {"method": "bnb-4bit"}},
    )
    model_id = response.json()["id"]
    while True:
        status = client.get(f"/v1/models/{model_id}").json()
        if status["state"] == "loading" and status["progress"]["bytes_done"] > 0:
            break
        assert status["state"] in ("queued", "loading"), status
    cancel = client.delete(f"/v1/models/{model_id}")
    assert cancel.status_code == 202, cancel.text
    assert cancel.json()["state"] == "cancelled"
    while client.get(f"/v1/models/{model_id}").status_code != 404:
        pass
    assert rss() - baseline < 64 * MiB
    assert not any((Path(client.app.state.settings.offload_dir)).iterdir())  # type: ignore[attr-defined]
