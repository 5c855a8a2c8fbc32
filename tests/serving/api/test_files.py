"""GET /v1/models/{id}/files serves the checkpoint's small files and nothing else: no
link to another model's weights, no hardlink of a file elsewhere, no database, no weights
under a tokenizer's name."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import CopyFactory, app_of, load
from tests.serving.api.test_hostile import problem


@pytest.fixture
def gpt2_copy(checkpoint_copy: CopyFactory) -> Path:
    target = checkpoint_copy("gpt2")
    (target / "vocab.txt").write_text("[PAD]\nhello\n")
    return target


def served(client: TestClient, model_id: str) -> set[str]:
    listed = client.get(f"/v1/models/{model_id}/files")
    assert listed.status_code == 200, listed.text
    return {f["name"] for f in listed.json()["files"]}


def refused(client: TestClient, model_id: str, name: str) -> None:
    problem(client.get(f"/v1/models/{model_id}/files/{name}"), 404, "file_not_found")


def test_plain_files_are_served(client: TestClient, gpt2_copy: Path) -> None:
    model_id = load(client, source=str(gpt2_copy), dtype="float32")["id"]
    assert served(client, model_id) >= {"config.json", "vocab.txt"}
    got = client.get(f"/v1/models/{model_id}/files/vocab.txt")
    assert got.status_code == 200 and got.content == b"[PAD]\nhello\n"
    assert "vocab.txt" in got.headers["content-disposition"]


def test_an_in_root_symlink_to_other_weights_is_not_served(
    client: TestClient, gpt2_copy: Path, models_root: Path
) -> None:
    (gpt2_copy / "tokenizer.model").symlink_to(models_root / "llama" / "model.safetensors")
    (gpt2_copy / "merges.txt").symlink_to(models_root / "llama" / "config.json")
    model_id = load(client, source=str(gpt2_copy), dtype="float32")["id"]
    assert not {"tokenizer.model", "merges.txt"} & served(client, model_id)
    refused(client, model_id, "tokenizer.model")
    refused(client, model_id, "merges.txt")


def test_a_hardlink_of_a_file_outside_the_roots_is_not_served(
    client: TestClient, gpt2_copy: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    os.link(secret, gpt2_copy / "vocab.json")
    model_id = load(client, source=str(gpt2_copy), dtype="float32")["id"]
    assert "vocab.json" not in served(client, model_id)
    refused(client, model_id, "vocab.json")


def test_the_state_database_is_not_served(client: TestClient, gpt2_copy: Path) -> None:
    database = Path(app_of(client).state.settings.state_dir) / "basehold.sqlite3"
    model_id = load(client, source=str(gpt2_copy), dtype="float32")["id"]
    os.link(database, gpt2_copy / "tokenizer.json")  # a hardlink: two links, refused
    refused(client, model_id, "tokenizer.json")
    copy = sqlite3.connect(gpt2_copy / "added_tokens.json")  # a database under a listed name
    copy.execute("CREATE TABLE t (x)")
    copy.commit()
    copy.close()
    refused(client, model_id, "added_tokens.json")


def test_weights_under_a_tokenizer_name_are_not_served(client: TestClient, gpt2_copy: Path) -> None:
    shutil.copy(gpt2_copy / "model.safetensors", gpt2_copy / "spiece.model")
    (gpt2_copy / "sentencepiece.bpe.model").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # pickle
    (gpt2_copy / "tokenizer.model").write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # torch zip
    model_id = load(client, source=str(gpt2_copy), dtype="float32")["id"]
    for name in ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model"):
        assert name not in served(client, model_id)
        refused(client, model_id, name)
