from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from service.loader.footprint import bytes_by_device, count_parameters
from service.loader.resident import copy_out_of_files, file_ranges


def test_tied_weights_count_once() -> None:
    embed = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert bytes_by_device(model) == {"cpu": 100 * 8 * 4}
    assert count_parameters(model) == 800


def test_file_backed_tensors_are_copied_out(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 64)
    module = nn.Module()
    # A tensor that is a view of a file mapping, as transformers hands out for safetensors.
    mapped = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    module.register_buffer("weight", mapped)
    assert file_ranges([path])
    assert copy_out_of_files(module, [path]) == path.stat().st_size
    assert copy_out_of_files(module, [path]) == 0
