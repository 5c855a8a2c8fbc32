from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from service.common.errors import InvalidCheckpoint
from service.loader.checkpoint import inspect_checkpoint, read_safetensors_header
from tests.conftest import CopyFactory, load


def write(path: Path) -> Path:
    save_file({"a": torch.zeros(10), "b": torch.ones(3, 4, dtype=torch.float16)}, str(path))
    return path


def test_sizes_come_from_the_header(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write(tmp_path / "model.safetensors")
    info = inspect_checkpoint(tmp_path, [tmp_path])
    assert info.tensor_bytes == {"a": 40, "b": 24}
    assert info.bytes_total == 64


def test_truncation_is_detected(tmp_path: Path) -> None:
    path = write(tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(InvalidCheckpoint, match="truncated"):
        read_safetensors_header(path)


def test_absurd_header_length(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InvalidCheckpoint, match="corrupt header"):
        read_safetensors_header(path)


def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(InvalidCheckpoint, match="no header"):
        read_safetensors_header(path)


def test_bin_checkpoints_count_file_bytes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 100)
    assert inspect_checkpoint(tmp_path, [tmp_path]).bytes_total == 100


def header_file(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "offsets", [["0", "16"], [0.0, 16.0], [8, 4], [-4, 16], [True, 16], [0, None]]
)
def test_offsets_that_are_not_ascending_integers_are_invalid(
    tmp_path: Path, offsets: list[object]
) -> None:
    path = header_file(
        tmp_path / "w.safetensors",
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": offsets}},
        b"\0" * 16,
    )
    with pytest.raises(InvalidCheckpoint, match="data_offsets"):
        read_safetensors_header(path)


def test_a_tensor_in_two_shards_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2), "c": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "one.safetensors", "c": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match=r"'a' is in two shards"):
        inspect_checkpoint(tmp_path, [tmp_path])


def test_a_bad_offset_fails_the_load_as_invalid_checkpoint(
    client: TestClient, checkpoint_copy: CopyFactory
) -> None:
    folder = checkpoint_copy("gpt2")
    weights = folder / "model.safetensors"
    header = read_safetensors_header(weights)
    data = weights.read_bytes()[8 + struct.unpack("<Q", weights.read_bytes()[:8])[0] :]
    name = next(n for n in header if n != "__metadata__")
    entry: Any = header[name]
    entry["data_offsets"] = [str(o) for o in entry["data_offsets"]]
    header_file(weights, dict(header), data)
    status = load(client, source=str(folder), dtype="float32")
    assert status["state"] == "failed"
    assert status["error"]["code"] == "invalid_checkpoint", status
