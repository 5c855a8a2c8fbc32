"""Unload gives the memory back: repeated load/unload of a ~100M-parameter model."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
import torch
from fastapi.testclient import TestClient

from tests import checkpoints
from tests.conftest import ClientFactory, app_of, load
from tests.shared_memory import held_shared_memory

MiB = 1 << 20


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    checkpoints.llama_100m(root / "llama-100m")
    return root


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def shared() -> int:
    """The shared memory the service holds: it runs in this process (its loaders in the
    template's); nobody else's counts (tests/shared_memory.py)."""
    return held_shared_memory(os.getpid())


def used() -> int:
    return rss() + shared()


@pytest.mark.slow
def test_repeated_load_unload_returns_rss(make_client: ClientFactory, big_root: Path) -> None:
    client: TestClient = make_client(model_roots=[big_root])
    source = str(big_root / "llama-100m")
    # Warm-up cycle: first use of transformers/torch code paths allocates for good.
    first = load(client, source=source, dtype="float32")
    footprint = first["memory"]["footprint_bytes"]
    assert footprint > 300 * MiB
    assert client.delete(f"/v1/models/{first['id']}").status_code == 204
    baseline, baseline_rss, baseline_shared = used(), rss(), shared()
    for _ in range(4):
        status = load(client, source=source, dtype="float32")
        assert status["state"] == "ready"
        # The weights live once, in the arena: not also as a private copy. (The arena, not
        # the sum with RSS, is bounded below: RSS may drop by what the warm-up left.)
        arena = shared() - baseline_shared
        assert footprint * 0.95 < arena < footprint * 1.2, arena / MiB
        assert used() - baseline < footprint * 1.2, (used() - baseline) / MiB
        assert rss() - baseline_rss < footprint * 0.2
        assert client.delete(f"/v1/models/{status['id']}").status_code == 204
    grown = used() - baseline
    assert grown < 64 * MiB, f"memory grew by {grown / MiB:.0f} MiB"
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        assert torch.cuda.memory_allocated() == 0


@pytest.mark.slow
def test_cancel_during_load_leaves_nothing(make_client: ClientFactory, big_root: Path) -> None:
    client: TestClient = make_client(model_roots=[big_root])
    source = str(big_root / "llama-100m")
    warm = load(client, source=source, dtype="bfloat16")
    client.delete(f"/v1/models/{warm['id']}")
    baseline = used()
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
    assert used() - baseline < 64 * MiB
    assert not any((Path(app_of(client).state.settings.offload_dir)).iterdir())
