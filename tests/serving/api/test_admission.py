"""Estimates against real loads, admission (507) and LRU-idle eviction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import LLAMA_LAYERS_ON_DISK, MINILM, ClientFactory, estimated_sizes, load

QUANTS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp16": {"dtype": "float16"},
    "nf4": {"dtype": "float32", "quantization": {"method": "bnb-4bit"}},
    "fp4-dq": {
        "dtype": "float32",
        "quantization": {"method": "bnb-4bit", "quant_type": "fp4", "double_quant": True},
    },
    "int8": {"dtype": "float32", "quantization": {"method": "bnb-8bit"}},
}


@pytest.mark.parametrize("quant", list(QUANTS))
def test_estimate_within_ten_percent(client: TestClient, models_root: Path, quant: str) -> None:
    sources = [
        *(str(models_root / n) for n in ("llama", "llama-tied", "gpt2", "t5", "bert-cls")),
        str(MINILM),
    ]
    for source in sources:
        body = {"source": source, **QUANTS[quant]}
        estimate = client.post("/v1/estimate", json=body)
        assert estimate.status_code == 200, estimate.text
        predicted = estimate.json()
        status = load(client, **body)
        assert status["state"] == "ready", status
        real = status["memory"]["footprint_bytes"]
        assert abs(predicted["total_bytes"] - real) <= 0.1 * real, (source, predicted, real)
        assert predicted["fits"] is True and predicted["free_bytes"]["cpu"] > 0
        assert set(predicted["by_device"]) == {"cpu"}
        assert 0 < predicted["largest_layer_bytes"] <= predicted["total_bytes"]
        client.delete(f"/v1/models/{status['id']}?force=true")


def test_estimate_with_disk_map(client: TestClient, models_root: Path) -> None:
    body: dict[str, Any] = {
        "source": str(models_root / "llama"),
        "dtype": "float32",
        "offload": True,
        "device_map": LLAMA_LAYERS_ON_DISK,
    }
    predicted = client.post("/v1/estimate", json=body).json()
    status = load(client, **body)
    for device in ("cpu", "disk"):
        real = status["memory"]["by_device"][device]
        assert abs(predicted["by_device"][device] - real) <= 0.1 * real


def test_estimate_errors_are_problems(client: TestClient, models_root: Path) -> None:
    wrong = client.post(
        "/v1/estimate", json={"source": str(models_root / "llama"), "task": "seq2seq-lm"}
    )
    assert wrong.status_code == 400 and wrong.json()["code"] == "wrong_model_type"


def test_small_budget_is_507(make_client: ClientFactory, models_root: Path) -> None:
    client = make_client(host_memory_budget="300KB", memory_headroom="0")
    response = client.post(
        "/v1/models", json={"source": str(models_root / "llama"), "dtype": "float32"}
    )
    assert response.status_code == 507, response.text
    problem = response.json()
    assert problem["code"] == "insufficient_memory"
    assert "cpu: needs" in problem["detail"] and "free" in problem["detail"]
    assert client.get("/v1/models").json()["models"] == []
    fits = client.post(
        "/v1/models",
        json={
            "source": str(models_root / "llama"),
            "quantization": {"method": "bnb-4bit"},
            "dtype": "bfloat16",
        },
    )
    assert fits.status_code == 507  # 4-bit llama-tiny still needs > 300 KB


def test_lru_idle_eviction_order(make_client: ClientFactory, models_root: Path) -> None:
    probe = make_client()
    gpt2, llama, t5 = estimated_sizes(probe, models_root, "gpt2", "llama", "t5")
    budget = gpt2 + llama + t5 // 2
    client = make_client(host_memory_budget=str(budget), memory_headroom="0", eviction="lru-idle")
    first = load(client, source=str(models_root / "gpt2"), dtype="float32")
    second = load(client, source=str(models_root / "llama"), dtype="float32")
    # Using the first again (an identical POST) makes the second the least recently used.
    assert (
        client.post(
            "/v1/models", json={"source": str(models_root / "gpt2"), "dtype": "float32"}
        ).status_code
        == 200
    )
    third = load(client, source=str(models_root / "t5"), dtype="float32")
    assert third["state"] == "ready"
    held = {m["id"] for m in client.get("/v1/models").json()["models"]}
    assert held == {first["id"], third["id"]}
    assert second["id"] not in held
    assert "basehold_evictions_total 1.0" in client.get("/metrics").text


def test_never_evicts_leased(make_client: ClientFactory, models_root: Path) -> None:
    probe = make_client()
    gpt2, llama = estimated_sizes(probe, models_root, "gpt2", "llama")
    client = make_client(
        host_memory_budget=str(gpt2 + llama // 2), memory_headroom="0", eviction="lru-idle"
    )
    leased = load(client, source=str(models_root / "gpt2"), dtype="float32")
    client.post(f"/v1/models/{leased['id']}/leases", json={"holder": "w", "ttl_seconds": 60})
    refused = client.post(
        "/v1/models", json={"source": str(models_root / "llama"), "dtype": "float32"}
    )
    assert refused.status_code == 507
    assert client.get(f"/v1/models/{leased['id']}").json()["state"] == "ready"
