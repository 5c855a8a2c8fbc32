"""The arena file and the share/attach round trip in one process."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from service.handles.arena import write_arena
from service.handles.attach import attach_handle
from service.handles.share import NotShareableModel, share
from service.memory.footprint import all_tensors
from service.memory.resident import file_ranges
from tests.reference import from_pretrained


def test_arena_is_valid_safetensors(shm_dir: Path) -> None:
    shm_dir.mkdir()
    tensors = {
        "a": torch.arange(10, dtype=torch.float32),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "c": torch.tensor([1, 2], dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
    }
    path, entries, data_start = write_arena(shm_dir, "m", tensors)
    assert data_start % mmap.PAGESIZE == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    with safe_open(str(path), framework="pt") as handle:
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    assert {e.name for e in entries} == set(tensors)


def in_arena(model: torch.nn.Module, arena: str) -> list[str]:
    ranges = file_ranges([Path(arena)])
    return [n for n, t in all_tensors(model) if not any(t.data_ptr() in r for r in ranges)]


QUANT = {
    "fp32": {},
    "bf16": {"dtype": torch.bfloat16},
    "nf4": {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    },
    "fp4-double-quant": {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    },
}


@pytest.mark.parametrize("kind", list(QUANT))
def test_share_then_attach_is_bit_identical(models_root: Path, shm_dir: Path, kind: str) -> None:
    shm_dir.mkdir()
    kwargs = {"dtype": torch.float32, **QUANT[kind]}
    model = from_pretrained(
        AutoModelForCausalLM, models_root / "llama-tied", device_map="cpu", **kwargs
    )
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(tokens).logits
    handle = share(model, "m", shm_dir).handle
    arena = handle.arena.path
    with torch.no_grad():
        after = model(tokens).logits
    assert torch.equal(before, after)
    assert in_arena(model, arena) == [], "service tensors left the arena after a forward"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    worker = attach_handle(handle.model_dump(mode="json"))
    with torch.no_grad():
        theirs = worker(tokens).logits
    assert torch.equal(before, theirs)
    assert in_arena(worker, arena) == []
    assert worker.lm_head.weight is worker.model.embed_tokens.weight
    assert not any(p.requires_grad for p in worker.parameters())


def test_eight_bit_is_not_shareable(models_root: Path, shm_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        models_root / "llama",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
    )
    with pytest.raises(NotShareableModel, match="8-bit"):
        share(model, "m", shm_dir)
