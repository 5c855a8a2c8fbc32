"""Loading over HTTP for real: every dtype, quantization and device map on CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from service.loader.pipeline import LoadContext, prepare
from service.loader.placement import PrivateMemory
from service.loader.strategies.registry import get_loader
from service.worker.attach import attach_fd
from tests.conftest import LLAMA_LAYERS_ON_DISK, MINILM, ClientFactory, app_of, load, wait_for


def held_model(client: TestClient, model_id: str) -> Any:
    """A shareable held model as a worker sees it: built from its handle over the service's
    own arena fd (the loader process that made it is gone)."""
    app = app_of(client)
    record = app.state.registry.get(model_id)
    assert record.loaded is not None and record.loaded.placed.handle is not None
    fd = app.state.placement.dup_fd(record.load_id)
    try:
        return attach_fd(record.loaded.placed.handle, fd)
    finally:
        os.close(fd)


def loaded_here(client: TestClient, model_id: str, offload: Path | None = None) -> Any:
    """A model the service holds in its runner (8-bit, offloaded), loaded here by the
    loader's own code from the same normalized spec."""
    app = app_of(client)
    spec = app.state.registry.get(model_id).spec
    ctx = LoadContext(
        roots=app.state.settings.model_roots,
        offload_root=Path("/nonexistent"),
        placement=PrivateMemory(),
    )
    resolved = prepare(spec, None, ctx).resolved
    return get_loader(spec).load(spec, resolved.path, resolved.task, resolved.config, offload)


@pytest.mark.parametrize(
    ("dtype", "expected", "width"),
    [
        ("auto", "float32", 4),
        ("float32", "float32", 4),
        ("float16", "float16", 2),
        ("bfloat16", "bfloat16", 2),
    ],
)
def test_every_dtype(
    client: TestClient, models_root: Path, dtype: str, expected: str, width: int
) -> None:
    status = load(client, source=str(models_root / "llama"), dtype=dtype)
    assert status["state"] == "ready", status
    assert status["dtype"] == expected
    assert status["task"] == "causal-lm"
    assert status["architecture"] == "LlamaForCausalLM"
    assert status["progress"]["phase"] == "done"
    assert status["progress"]["bytes_done"] == status["progress"]["bytes_total"] > 0
    params = status["parameters"]
    assert params > 100_000
    # Parameters plus the rotary inv_freq buffer: footprint follows the dtype width.
    assert params * width <= status["memory"]["footprint_bytes"] < params * width * 1.01
    model = held_model(client, status["id"])
    assert all(p.dtype == getattr(torch, expected) for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_held_model_matches_plain_from_pretrained(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "llama"), dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(models_root / "llama", dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 42, 7]])
    with torch.no_grad():
        ours = held_model(client, status["id"])(tokens).logits
        theirs = reference(tokens).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_4bit(
    client: TestClient, models_root: Path, quant_type: str, double_quant: bool
) -> None:
    status = load(
        client,
        source=str(models_root / "llama"),
        quantization={
            "method": "bnb-4bit",
            "quant_type": quant_type,
            "double_quant": double_quant,
            "skip_modules": ["lm_head"],
        },
    )
    assert status["state"] == "ready", status
    quant = status["quantization"]
    assert quant["quant_type"] == quant_type and quant["double_quant"] is double_quant
    assert quant["compute_dtype"] == "float32"  # no CUDA: float32 compute by default
    model = held_model(client, status["id"])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    state: Any = getattr(q_proj.weight, "quant_state")  # noqa: B009 - Params4bit's field
    assert state.quant_type == quant_type
    assert (state.nested is True) is double_quant
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # skip_modules honoured
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_4bit_is_smaller_than_fp32(client: TestClient, models_root: Path) -> None:
    full = load(client, source=str(models_root / "llama"), dtype="float32")
    four = load(
        client,
        source=str(models_root / "llama"),
        dtype="float32",
        quantization={"method": "bnb-4bit"},
    )
    assert four["parameters"] == full["parameters"]
    linear_bytes = full["memory"]["footprint_bytes"] - 2 * 1000 * 64 * 4  # minus embeddings
    saved = full["memory"]["footprint_bytes"] - four["memory"]["footprint_bytes"]
    assert saved > linear_bytes * 0.8


def test_bnb_8bit(client: TestClient, models_root: Path) -> None:
    status = load(
        client,
        source=str(models_root / "llama"),
        quantization={"method": "bnb-8bit", "int8_threshold": 4.0},
    )
    assert status["state"] == "ready", status
    assert status["quantization"]["int8_threshold"] == 4.0
    assert status["shareable"] is False  # held by its runner process
    model = loaded_here(client, status["id"])
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8
    assert layer.state.threshold == 4.0


@pytest.mark.parametrize("device_map", ["cpu", "auto", "sequential", "balanced"])
def test_named_device_maps(client: TestClient, models_root: Path, device_map: str) -> None:
    status = load(client, source=str(models_root / "gpt2"), device_map=device_map)
    assert status["state"] == "ready", status
    assert set(status["memory"]["by_device"]) == {"cpu"}


def test_explicit_device_map_with_disk(
    client: TestClient, models_root: Path, tmp_path: Path
) -> None:
    device_map = LLAMA_LAYERS_ON_DISK
    status = load(
        client,
        source=str(models_root / "llama"),
        dtype="float32",
        device_map=device_map,
        offload=True,
    )
    assert status["state"] == "ready", status
    assert status["device_map"]["model.layers"] == "disk"
    by_device = status["memory"]["by_device"]
    assert by_device["disk"] > 0 and by_device["cpu"] > 0
    model = loaded_here(client, status["id"], tmp_path / "offload")
    assert torch.isfinite(model(torch.tensor([[3, 4]])).logits).all()


def test_max_memory_offloads_to_disk(client: TestClient, models_root: Path) -> None:
    status = load(
        client,
        source=str(models_root / "llama"),
        dtype="float32",
        max_memory={"cpu": "300KB"},
        offload=True,
    )
    assert status["state"] == "ready", status
    assert "disk" in status["device_map"].values()
    assert status["spec"]["max_memory"] == {"cpu": 300_000}
    assert status["memory"]["by_device"]["disk"] > 0


def test_disk_without_offload_is_invalid(client: TestClient, models_root: Path) -> None:
    response = client.post(
        "/v1/models",
        json={
            "source": str(models_root / "llama"),
            "device_map": {"model": "disk", "lm_head": "cpu"},
        },
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_spec"
    assert "offload" in response.json()["detail"]


def test_task_inference_and_auto_classes(client: TestClient, models_root: Path) -> None:
    expected = {
        "llama": ("causal-lm", "LlamaForCausalLM"),
        "gpt2": ("causal-lm", "GPT2LMHeadModel"),
        "t5": ("seq2seq-lm", "T5ForConditionalGeneration"),
        "bert-cls": ("seq-cls", "BertForSequenceClassification"),
    }
    for folder, (task, arch) in expected.items():
        status = load(client, source=str(models_root / folder))
        assert (status["task"], status["architecture"]) == (task, arch), status


def test_token_cls_with_labels(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "bert-cls"), task="token-cls", num_labels=7)
    assert status["architecture"] == "BertForTokenClassification"
    model = held_model(client, status["id"])
    assert model.classifier.out_features == 7


def test_minilm_real_checkpoint_as_base_and_seq_cls(client: TestClient) -> None:
    base = load(client, source=str(MINILM), task="base")
    assert base["state"] == "ready" and base["architecture"] == "BertModel"
    assert 22_000_000 < base["parameters"] < 23_000_000
    cls = load(client, source=str(MINILM), task="seq-cls", num_labels=4)
    assert cls["architecture"] == "BertForSequenceClassification"
    assert held_model(client, cls["id"]).classifier.out_features == 4
    inferred = load(client, source=str(MINILM))
    assert inferred["task"] == "base"


def test_identical_requests_are_idempotent(client: TestClient, models_root: Path) -> None:
    body = {"source": str(models_root / "gpt2"), "dtype": "float32"}
    first = client.post("/v1/models", json=body)
    assert first.status_code == 202
    assert first.headers["location"] == f"/v1/models/{first.json()['id']}"
    wait_for(client, first.json()["id"])
    # Same spec written differently (defaults spelled out) is the same model.
    second = client.post("/v1/models", json={**body, "device_map": "auto", "offload": False})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]


def test_twenty_concurrent_posts_make_one_load(client: TestClient, models_root: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"source": str(models_root / "t5"), "dtype": "float32", "name": "t5-once"}
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/models", json=body), range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 19 + [202]
    assert {r.json()["id"] for r in responses} == {"t5-once"}
    wait_for(client, "t5-once")
    assert len(client.get("/v1/models").json()["models"]) == 1


def test_name_taken(client: TestClient, models_root: Path) -> None:
    load(client, source=str(models_root / "gpt2"), name="shared-name")
    response = client.post(
        "/v1/models", json={"source": str(models_root / "t5"), "name": "shared-name"}
    )
    assert response.status_code == 409
    assert response.json()["code"] == "name_taken"


def test_queued_load_is_cancelled_synchronously(
    make_client: ClientFactory, models_root: Path
) -> None:
    client = make_client(max_concurrent_loads=1)
    first = client.post("/v1/models", json={"source": str(MINILM), "dtype": "float32"}).json()
    second = client.post("/v1/models", json={"source": str(models_root / "gpt2")}).json()
    assert second["state"] == "queued"
    response = client.delete(f"/v1/models/{second['id']}")
    assert response.status_code in (202, 204)
    wait_for(client, first["id"])
    assert client.get(f"/v1/models/{second['id']}").status_code == 404


def test_unload_returns_404_after(client: TestClient, models_root: Path) -> None:
    status = load(client, source=str(models_root / "gpt2"))
    assert client.delete(f"/v1/models/{status['id']}").status_code == 204
    missing = client.get(f"/v1/models/{status['id']}")
    assert missing.status_code == 404
    assert missing.json()["code"] == "model_not_found"
    assert client.delete(f"/v1/models/{status['id']}").status_code == 404


def test_held_weights_are_private_not_file_mapped(client: TestClient, models_root: Path) -> None:
    from service.loader.resident import file_ranges

    status = load(client, source=str(models_root / "llama"), dtype="float32")
    model = held_model(client, status["id"])
    ranges = file_ranges([models_root / "llama" / "model.safetensors"])
    pointers = [t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]]
    assert not [p for p in pointers if any(p in r for r in ranges)]
