"""The arena file and the share/attach round trip in one process."""

from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from service.common.handles.arena import map_copy_on_write, write_arena
from service.common.handles.memfd import is_sealed
from service.loader.footprint import all_tensors
from service.loader.resident import file_ranges
from service.loader.share import NotShareableModel, share
from service.worker.attach import attach_fd
from tests.reference import from_pretrained

TENSORS = {
    "a": torch.arange(10, dtype=torch.float32),
    "b": torch.ones(3, dtype=torch.bfloat16),
    "c": torch.tensor([1, 2], dtype=torch.uint8),
    "scalar": torch.tensor(3.5),
}


def test_arena_is_a_sealed_memfd_holding_valid_safetensors() -> None:
    arena = write_arena("m", TENSORS)
    try:
        assert arena.data_start % mmap.PAGESIZE == 0
        assert is_sealed(arena.fd)
        assert os.readlink(f"/proc/self/fd/{arena.fd}").startswith("/memfd:basehold:m")
        with safe_open(f"/proc/self/fd/{arena.fd}", framework="pt") as handle:
            for name, tensor in TENSORS.items():
                assert torch.equal(handle.get_tensor(name), tensor)
        assert {e.name for e in arena.entries} == set(TENSORS)
    finally:
        os.close(arena.fd)


def test_nobody_can_change_a_sealed_arena() -> None:
    """Not the owner, not through a fresh open of /proc/self/fd, not by mapping it."""
    arena = write_arena("m", TENSORS)
    before = os.pread(arena.fd, arena.size, 0)
    reopened = os.open(f"/proc/self/fd/{arena.fd}", os.O_RDWR)
    try:
        for fd in (arena.fd, reopened):
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"poison", arena.data_start)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        private = map_copy_on_write(arena.fd)
        private[arena.data_start] = 0xFF  # copy-on-write: this mapping's own page
        assert private[arena.data_start] == 0xFF
        assert os.pread(arena.fd, arena.size, 0) == before
    finally:
        os.close(reopened)
        os.close(arena.fd)


def in_arena(model: torch.nn.Module, arena_name: str) -> list[str]:
    ranges = file_ranges([Path(f"/memfd:{arena_name}")])
    assert ranges, f"{arena_name} is not mapped here"
    return [n for n, t in all_tensors(model) if not any(t.data_ptr() in r for r in ranges)]


SOCKET = "/nonexistent/basehold.sock"  # in-process attaches take the fd directly
QUANT: dict[str, dict[str, Any]] = {
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
def test_share_then_attach_is_bit_identical(models_root: Path, kind: str) -> None:
    kwargs = {"dtype": torch.float32, **QUANT[kind]}
    model = from_pretrained(
        AutoModelForCausalLM, models_root / "llama-tied", device_map="cpu", **kwargs
    )
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(tokens).logits
    shared = share(model, "m", SOCKET)
    handle, arena = shared.handle, shared.handle.arena.name
    with torch.no_grad():
        after = model(tokens).logits
    assert torch.equal(before, after)
    assert in_arena(model, arena) == [], "service tensors left the arena after a forward"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    worker: Any = attach_fd(handle.model_dump(mode="json"), shared.fd)
    with torch.no_grad():
        theirs = worker(tokens).logits
    assert torch.equal(before, theirs)
    assert in_arena(worker, arena) == []
    assert worker.lm_head.weight is worker.model.embed_tokens.weight
    assert not any(p.requires_grad for p in worker.parameters())


def test_an_in_place_write_in_a_worker_stays_its_own(models_root: Path) -> None:
    model = from_pretrained(AutoModelForCausalLM, models_root / "llama", device_map="cpu")
    shared = share(model, "m", SOCKET)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(tokens).logits
        writer = attach_fd(shared.handle, shared.fd)
        for parameter in writer.parameters():
            parameter.add_(1.0)  # what merge_and_unload() and friends do
        assert not torch.equal(writer(tokens).logits, before)
        assert torch.equal(model(tokens).logits, before)
        assert torch.equal(attach_fd(shared.handle, shared.fd)(tokens).logits, before)


def test_eight_bit_is_not_shareable(models_root: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        models_root / "llama",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
    )
    with pytest.raises(NotShareableModel, match="8-bit"):
        share(model, "m", SOCKET)


def memfds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:basehold:leak"):
            found.add(fd)
    return found


@pytest.mark.parametrize("failing", ["bind", "Handle", "disable_cpu_repack"])
def test_a_failure_after_the_arena_is_written_closes_it(
    models_root: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """While it is written (re-pointing a tensor to it: `bind`) or after."""
    import service.loader.share as share_module

    model = from_pretrained(AutoModelForCausalLM, models_root / "gpt2", dtype=torch.float32)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{failing} failed")

    if failing == "bind":
        from service.loader import rebind

        monkeypatch.setattr(share_module, "rebind", SimpleNamespace(sites=rebind.sites, bind=boom))
    else:
        monkeypatch.setattr(share_module, failing, boom)
    before = memfds()
    try:
        share(model, "leak", "/nonexistent.sock")
    except RuntimeError as exc:
        assert str(exc) == f"{failing} failed"
    else:
        raise AssertionError("share did not fail")
    # The load that failed drops its model (and with it any mapping of the arena).
    del model
    gc.collect()
    assert memfds() == before, "the arena's memfd leaked"
