"""The Node Feature Discovery feature file: label-safe names, and a file that follows the
registry (ready shareable models only) and goes away at shutdown."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from service.app import create_app
from service.node_features import label_name
from service.settings import Settings
from tests.conftest import load

LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def test_label_safe_ids_are_kept_and_the_rest_are_made_safe() -> None:
    assert label_name("llama-q4") == "basehold-model.llama-q4"
    assert label_name("Llama_3.1") == "basehold-model.Llama_3.1"
    made = label_name("meta-llama/Llama-3.1-8B")
    assert made.startswith("basehold-model.meta-llama-Llama-3.1-8B-") and len(made) <= 63
    assert label_name("a/b") != label_name("a-b")  # replaced characters never collide
    long = "x" * 100
    assert len(label_name(long)) == 63 and label_name(long) != label_name("x" * 99)


@given(st.text(min_size=1, max_size=300))
def test_every_label_is_a_valid_kubernetes_label_name(model_id: str) -> None:
    name = label_name(model_id)
    assert len(name) <= 63 and LABEL.match(name), name


def features(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_file_lists_ready_shareable_models_and_goes_at_shutdown(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    path = tmp_path / "features.d" / "basehold"
    path.parent.mkdir()
    settings = Settings(
        state_dir=tmp_path / "state",
        socket=socket_path,
        model_roots=[models_root],
        node_features_file=path,
    )
    long_name = "a-very-long-model-name-that-does-not-fit-in-a-kubernetes-label"
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        assert features(path) == ["basehold.ready=true"]
        load(client, source=str(models_root / "gpt2"), name=long_name)
        eight = {"method": "bnb-8bit"}
        load(client, source=str(models_root / "llama"), name="eight", quantization=eight)
        assert features(path) == ["basehold.ready=true", f"{label_name(long_name)}=ready"]
        assert len(label_name(long_name)) == 63
        assert oct(path.stat().st_mode & 0o777) == "0o644"
        assert client.delete(f"/v1/models/{long_name}").status_code == 204
        assert features(path) == ["basehold.ready=true"]
        load(client, source=str(models_root / "llama"), name="kept", dtype="float32")
        assert features(path) == ["basehold.ready=true", "basehold-model.kept=ready"]
    assert not path.exists()  # the service stopped: its labels go
    assert list(path.parent.iterdir()) == []  # and no temporary file is left behind
