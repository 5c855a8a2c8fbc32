"""Every error code of the core contract, and that a failed load leaves the service serving."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Answer, CopyFactory, load, wait_for


@pytest.fixture
def copy_llama(checkpoint_copy: CopyFactory) -> Path:
    """A private copy of the llama checkpoint under the allowed root, to damage."""
    return checkpoint_copy("llama")


def assert_problem(response: Answer, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["status"] == status
    assert isinstance(body["detail"], str) and len(body["detail"]) > 20
    return body


def failed_with(client: TestClient, code: str, **body: Any) -> str:
    status = load(client, **body)
    assert status["state"] == "failed", status
    assert status["error"]["code"] == code, status["error"]
    assert status["memory"]["footprint_bytes"] == 0
    return str(status["error"]["message"])


def test_truncated_weights_fail_then_retry_after_fix(client: TestClient, copy_llama: Path) -> None:
    weights = copy_llama / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    message = failed_with(client, "invalid_checkpoint", source=str(copy_llama))
    assert "truncated" in message and "Re-download" in message
    weights.write_bytes(good)
    retried = client.post("/v1/models", json={"source": str(copy_llama)})
    assert retried.status_code == 202  # a failed record is retried, not returned
    assert wait_for(client, retried.json()["id"])["state"] == "ready"


def test_corrupt_header(client: TestClient, copy_llama: Path) -> None:
    weights = copy_llama / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12
    weights.write_bytes(bytes(data))
    assert "corrupt" in failed_with(client, "invalid_checkpoint", source=str(copy_llama))


def test_missing_config(client: TestClient, copy_llama: Path) -> None:
    (copy_llama / "config.json").unlink()
    assert "config.json" in failed_with(client, "invalid_checkpoint", source=str(copy_llama))


def test_missing_shard(client: TestClient, copy_llama: Path) -> None:
    index = {"metadata": {"total_size": 1}, "weight_map": {"lm_head.weight": "shard-2.safetensors"}}
    (copy_llama / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard-2" in failed_with(client, "invalid_checkpoint", source=str(copy_llama))


def test_no_weights(client: TestClient, copy_llama: Path) -> None:
    (copy_llama / "model.safetensors").unlink()
    assert "no weights" in failed_with(client, "invalid_checkpoint", source=str(copy_llama))


def test_wrong_model_type_lists_working_tasks(client: TestClient, models_root: Path) -> None:
    message = failed_with(
        client, "wrong_model_type", source=str(models_root / "llama"), task="seq2seq-lm"
    )
    assert "causal-lm" in message and "seq-cls" in message and "seq2seq-lm" in message


def test_config_needing_remote_code(client: TestClient, copy_llama: Path) -> None:
    config = json.loads((copy_llama / "config.json").read_text())
    config.update(model_type="acme-secret", auto_map={"AutoConfig": "acme.AcmeConfig"})
    (copy_llama / "config.json").write_text(json.dumps(config))
    # A local checkpoint is prepared at POST: refused at once, nothing queued.
    response = client.post("/v1/models", json={"source": str(copy_llama)})
    assert "trust_remote_code" in str(
        assert_problem(response, 403, "remote_code_refused")["detail"]
    )
    assert client.get("/v1/models").json()["models"] == []


def test_trust_remote_code_refused_by_server(client: TestClient, models_root: Path) -> None:
    response = client.post(
        "/v1/models", json={"source": str(models_root / "llama"), "trust_remote_code": True}
    )
    assert "BASEHOLD_ALLOW_REMOTE_CODE" in str(
        assert_problem(response, 403, "remote_code_refused")["detail"]
    )


def test_source_outside_roots(client: TestClient, tmp_path: Path) -> None:
    assert_problem(
        client.post("/v1/models", json={"source": str(tmp_path)}), 403, "source_not_allowed"
    )


def test_dotdot_refused(client: TestClient, models_root: Path) -> None:
    sneaky = f"{models_root}/llama/../llama"
    assert_problem(client.post("/v1/models", json={"source": sneaky}), 403, "source_not_allowed")


def test_symlink_escape_refused(client: TestClient, models_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(models_root / "gpt2", outside)
    link = models_root / f"link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(outside)
    assert_problem(client.post("/v1/models", json={"source": str(link)}), 403, "source_not_allowed")


def test_missing_local_source(client: TestClient, models_root: Path) -> None:
    assert_problem(
        client.post("/v1/models", json={"source": str(models_root / "nope")}),
        404,
        "source_not_found",
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"source": "./models/llama"}, "absolute"),
        ({"task": "causal-lm", "num_labels": 3}, "num_labels"),
        ({"device_map": "cuda:0"}, "no CUDA device"),
        ({"device_map": {"model": "cuda:1"}}, "no CUDA device"),
        ({"max_memory": {"0": "1GiB"}}, "no CUDA device"),
        ({"max_memory": {"cpu": "lots"}}, "not a size"),
        ({"device_map": "cpu", "max_memory": {"cpu": "1GiB"}}, "max_memory only applies"),
        ({"quantization": {"method": "bnb-8bit", "quant_type": "nf4"}}, "quant_type"),
        ({"quantization": {"method": "bnb-4bit", "int8_threshold": 6.0}}, "int8_threshold"),
        (
            {
                "quantization": {"method": "bnb-4bit"},
                "offload": True,
                "device_map": {"model": "disk", "lm_head": "cpu"},
            },
            "disk",
        ),
        ({"attn_implementation": "flash_attention_2"}, "CUDA"),
        ({"revision": "main"}, "hub sources only"),
    ],
)
def test_invalid_specs(
    client: TestClient, models_root: Path, body: dict[str, object], fragment: str
) -> None:
    request = {"source": str(models_root / "llama"), **body}
    problem = assert_problem(client.post("/v1/models", json=request), 400, "invalid_spec")
    assert fragment in str(problem["detail"])


def test_validation_errors_are_problems(client: TestClient, models_root: Path) -> None:
    response = client.post(
        "/v1/models",
        json={"source": str(models_root / "llama"), "dtype": "float8", "name": "Bad Name"},
    )
    problem = assert_problem(response, 422, "invalid_spec")
    assert len(problem["errors"]) == 2


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404, "not_found")


def test_service_keeps_serving_after_failures(
    client: TestClient, copy_llama: Path, models_root: Path
) -> None:
    (copy_llama / "config.json").unlink()
    failed_with(client, "invalid_checkpoint", source=str(copy_llama))
    assert load(client, source=str(models_root / "gpt2"))["state"] == "ready"
    failed = [m for m in client.get("/v1/models").json()["models"] if m["state"] == "failed"]
    assert len(failed) == 1
    assert client.delete(f"/v1/models/{failed[0]['id']}").status_code == 204


def test_a_skip_modules_entry_that_is_not_a_pattern_is_refused_at_post(
    client: TestClient, models_root: Path
) -> None:
    """Found by the fuzzer: transformers matches skip_modules as regular expressions, and a
    "*" failed the load inside the loader with a traceback (internal)."""
    body = {
        "source": str(models_root / "llama"),
        "quantization": {"method": "bnb-4bit", "skip_modules": ["*"]},
    }
    answer = client.post("/v1/models", json=body)
    assert answer.status_code == 422 and answer.json()["code"] == "invalid_spec", answer.text
    assert "not a valid pattern" in answer.json()["detail"]
