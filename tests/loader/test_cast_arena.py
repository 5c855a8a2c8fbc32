"""Cast into the arena: a CPU load whose weights transformers casts writes each cast
straight into the arena's memfd, which becomes the sealed arena; the model equals
`from_pretrained`'s, and anything the plan does not fit takes the usual path."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from service.common.handles.memfd import is_sealed
from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest
from service.loader.arena_placement import ArenaPlacement
from service.loader.cast_arena import CastArena
from service.loader.direct import PADDING
from service.loader.pipeline import load_and_place, prepare
from service.loader.share import Shared, share
from service.worker.attach import attach_fd
from tests import checkpoints
from tests.loader.test_direct import SOCKET, arena_context

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])

CASES: list[tuple[str, Callable[[Path], Path], Any, torch.dtype]] = [
    ("llama-bf16", checkpoints.llama, AutoModelForCausalLM, torch.bfloat16),
    ("llama-fp16", checkpoints.llama, AutoModelForCausalLM, torch.float16),
    ("gpt2-tied-bf16", checkpoints.gpt2, AutoModelForCausalLM, torch.bfloat16),
    ("t5-keeps-fp32-fp16", checkpoints.t5, AutoModelForSeq2SeqLM, torch.float16),
    ("bert-cls-bf16", checkpoints.bert_cls, AutoModelForSequenceClassification, torch.bfloat16),
    # A converter splits each layer's `weights_in`: its inputs are cast as it gathers them.
    ("dinov2-swiglu-converted-bf16", checkpoints.dinov2, AutoModel, torch.bfloat16),
]


def _cast_loaded(path: Path, auto: Any, dtype: torch.dtype) -> tuple[Any, CastArena]:
    ahead = CastArena.start("m", sorted(path.glob("*.safetensors")))
    with ahead.loading():
        model = auto.from_pretrained(str(path), dtype=dtype, device_map="cpu")
    return model, ahead


def _mappings(name: str, mode: str) -> list[str]:
    """This process's mappings of the memfd called `name` with `mode` ("rw-s": shared
    writable, "rw-p": copy-on-write)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in lines if f"memfd:{name}" in line and line.split()[1] == mode]


def _shared(model: Any, ahead: CastArena) -> Shared:
    try:
        return share(model, "m", SOCKET, prefetch=ahead)
    finally:
        ahead.close()


@pytest.mark.parametrize(("case", "save", "auto", "dtype"), CASES, ids=[c[0] for c in CASES])
def test_the_casts_write_the_arena_and_the_model_is_from_pretrained_s(
    tmp_path: Path, case: str, save: Callable[[Path], Path], auto: Any, dtype: torch.dtype
) -> None:
    path = save(tmp_path / case)
    reference = auto.from_pretrained(str(path), dtype=dtype, device_map="cpu")
    model, ahead = _cast_loaded(path, auto, dtype)
    assert ahead.fd is not None  # the casts planned the arena and wrote into it
    cast_into = os.fstat(ahead.fd).st_ino
    assert _mappings("basehold:m", "rw-p")  # the model's views of the casts: copy-on-write
    assert not _mappings("basehold:m", "rw-s")  # the casts were written, never mapped so
    shared = _shared(model, ahead)
    gc.collect()
    assert os.fstat(shared.fd).st_ino == cast_into  # what the casts wrote is the arena
    assert is_sealed(shared.fd)
    assert not _mappings("basehold:m", "rw-p")  # the model reads a read-only mapping
    expected, state = reference.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
    held = load_safetensors(os.pread(shared.fd, shared.arena.size, 0))
    everything = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    held.pop(PADDING, None)  # the alignment of what follows the casts
    for name, tensor in held.items():  # tied tensors once, computed buffers too
        assert torch.equal(tensor, everything[name]), name
    if auto is AutoModelForCausalLM:
        with torch.no_grad():
            logits = reference(TOKENS).logits
            assert torch.equal(model(TOKENS).logits, logits)
            assert torch.equal(attach_fd(shared.handle, shared.fd)(TOKENS).logits, logits)
    shared.close()


def test_a_parameter_the_checkpoint_lacks_is_appended_after_the_casts(tmp_path: Path) -> None:
    """transformers initializes it (the norm's weight: ones); the casts' memfd is still the
    arena, with it after them."""
    path = checkpoints.llama(tmp_path / "llama")
    file = path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    model, ahead = _cast_loaded(path, AutoModelForCausalLM, torch.bfloat16)
    assert ahead.fd is not None
    cast_into = os.fstat(ahead.fd).st_ino
    shared = _shared(model, ahead)
    assert os.fstat(shared.fd).st_ino == cast_into
    entries = {e.name: e for e in shared.arena.entries}
    assert entries["model.norm.weight"].offset == max(e.offset for e in entries.values())
    held = load_safetensors(os.pread(shared.fd, shared.arena.size, 0))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(held[name], tensor), name
    shared.close()


def test_a_cast_the_model_no_longer_holds_sends_the_arena_the_usual_way(tmp_path: Path) -> None:
    """A tensor replaced after the load: its cast would be bytes no tensor uses, so the arena
    is written from the model instead, and the casts' memory goes with its last view."""
    path = checkpoints.llama(tmp_path / "llama")
    model, ahead = _cast_loaded(path, AutoModelForCausalLM, torch.bfloat16)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert ahead.fd is not None
    cast_into = os.fstat(ahead.fd).st_ino
    shared = _shared(model, ahead)
    assert os.fstat(shared.fd).st_ino != cast_into
    assert is_sealed(shared.fd)
    gc.collect()
    assert not _mappings("basehold:m", "rw-p")
    held = load_safetensors(os.pread(shared.fd, shared.arena.size, 0))
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(held[name], tensor), name
    shared.close()


def test_a_cast_changed_in_place_sends_the_arena_the_usual_way(tmp_path: Path) -> None:
    """A write to a cast (code that scales a weight after the load, say) lands in this
    process's copy-on-write page, not in the memfd: the arena is written from the model,
    with the change."""
    path = checkpoints.llama(tmp_path / "llama")
    model, ahead = _cast_loaded(path, AutoModelForCausalLM, torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    changed = model.model.norm.weight.detach().clone()
    assert ahead.fd is not None
    cast_into = os.fstat(ahead.fd).st_ino
    shared = _shared(model, ahead)
    assert os.fstat(shared.fd).st_ino != cast_into
    held = load_safetensors(os.pread(shared.fd, shared.arena.size, 0))
    assert torch.equal(held["model.norm.weight"], changed)
    assert torch.equal(model.model.norm.weight, changed)
    shared.close()


def test_a_load_through_the_pipeline_casts_into_its_arena(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = checkpoints.llama(tmp_path / "models" / "llama")
    ctx = arena_context(tmp_path)
    spec = LoadRequest.model_validate({"source": str(path), "dtype": "bfloat16"})
    with caplog.at_level("DEBUG", logger="basehold.loading"):
        loaded = load_and_place("m", "load-1", prepare(spec, None, ctx), ctx, Progress())
    assert "load-1: cast into the arena" in caplog.text
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    placement = ctx.placement
    assert isinstance(placement, ArenaPlacement)
    assert placement.shared("load-1") is not None
    placement.release("load-1")


def test_a_cycle_that_still_holds_a_cast_does_not_keep_the_arena_from_being_sealed(
    tmp_path: Path,
) -> None:
    """Where only a reference cycle holds a view of a cast (an exception's traceback, say),
    the arena is sealed all the same: the casts' mapping is copy-on-write, which the seal
    does not wait for (a shared writable one would be refused, EBUSY)."""
    path = checkpoints.llama(tmp_path / "llama")
    model, ahead = _cast_loaded(path, AutoModelForCausalLM, torch.bfloat16)
    cycle: list[Any] = [model.lm_head.weight.data]  # a view of the casts' mapping
    cycle.append(cycle)
    del cycle
    gc.disable()
    try:
        shared = _shared(model, ahead)
    finally:
        gc.enable()
    try:
        assert is_sealed(shared.fd)
        assert not _mappings("basehold:m", "rw-s")
    finally:
        shared.close()
