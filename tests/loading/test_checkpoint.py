from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.errors import InvalidCheckpoint
from service.loading.checkpoint import inspect_checkpoint, read_safetensors_header


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
