"""Read-only device segments, rehearsed on the CPU through the segment path: the host
stand-in maps a worker's segments PROT_READ (a write that reached one would kill this
process with SIGSEGV, as it would poison a GPU worker's CUDA context), and the attached
base's tensors are copy-on-write per tensor (service/worker/copy_on_write.py)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from service.loader.share import Shared, share
from service.worker.attach import attach_fd
from service.worker.copy_on_write import on_segment
from tests.common.handles.host_segments import HostSegments
from tests.common.handles.test_arena import QUANT
from tests.reference import from_pretrained
from tests.worker.hf_worker import small_random_lora

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])
SOCKET = "/nonexistent/basehold.sock"  # in-process attaches take the fds directly


def shared_on_segment(models_root: Path, kind: str) -> tuple[Shared, HostSegments]:
    """A Llama of `kind` placed in one stand-in device segment, as a loader leaves it."""
    model = from_pretrained(
        AutoModelForCausalLM,
        models_root / "llama",
        device_map="cpu",
        **{"dtype": torch.float32, **QUANT[kind]},
    )
    segments = HostSegments()
    return share(model, "m", SOCKET, segments), segments


def digest(shared: Shared) -> str:
    """The segments' bytes, read through the loader's own (read-write) mappings of them."""
    hashed = hashlib.sha256()
    for segment in shared.segments:
        hashed.update(segment.numpy().tobytes())
    return hashed.hexdigest()


def attach(shared: Shared, segments: HostSegments) -> Any:
    return attach_fd(shared.handle, shared.fd, segments, shared.segment_fds)


def mapping_permissions(tensor: torch.Tensor) -> str:
    """The permissions /proc/self/maps shows for the mapping holding `tensor`."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, permissions = line.split()[:2]
        start, end = (int(part, 16) for part in span.split("-"))
        if start <= address < end:
            return permissions
    raise AssertionError(f"{address:#x} is in no mapping")


@pytest.mark.parametrize("kind", ["fp32", "bf16", "nf4"])
def test_merge_and_unload_writes_private_copies_never_the_segment(
    models_root: Path, kind: str
) -> None:
    shared, segments = shared_on_segment(models_root, kind)
    before = digest(shared)
    worker: Any = attach(shared, segments)
    other: Any = attach(shared, segments)
    assert worker.basehold_segments == [
        {"name": s.name, "device_uuid": "GPU-host-stand-in", "read_only": True}
        for s in shared.handle.segments
    ]
    embed = worker.model.embed_tokens.weight
    assert mapping_permissions(embed) == "r--s"  # a stray write would fault: the point
    with torch.no_grad():
        base = other(TOKENS).logits
        peft_model = small_random_lora(worker)
        adapted = peft_model(TOKENS).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(TOKENS).logits
        assert torch.equal(other(TOKENS).logits, base), "another worker saw the merge"
    assert digest(shared) == before, "the merge wrote into the segment"
    assert not torch.equal(merged, base)
    # As test_hf_workers' merge: float rounding in fp32 and bf16; nf4 re-quantizes.
    scale = float(adapted.abs().max())
    tolerance = {"fp32": 1e-5 * max(scale, 1.0), "bf16": 0.05 * scale, "nf4": 0.15 * scale}
    assert float((merged - adapted).abs().max()) <= tolerance[kind]
    layer = merged_model.model.layers[0]
    # Only the merged tensors were copied; the rest still reads the segment.
    assert on_segment(layer.self_attn.k_proj.weight) == (kind != "nf4")
    assert on_segment(layer.input_layernorm.weight)
    assert on_segment(merged_model.model.embed_tokens.weight)
    if kind != "nf4":  # a 4-bit merge replaces the packed weight: nothing to copy
        assert not on_segment(layer.self_attn.q_proj.weight)


Write = Callable[[nn.Parameter], object]

WRITES: dict[str, Write] = {
    "add_": lambda p: p.add_(1.0),
    "data +=": lambda p: p.data.__iadd__(1.0),  # `p.data += 1` is this, then `p.data = `
    "alias of .data": lambda p: p.data.mul_(2.0),
    "item assignment": lambda p: p.__setitem__(0, 3.0),
    "slice of a view": lambda p: p.view(-1)[:3].fill_(5.0),
    "out=": lambda p: torch.add(p, 1.0, out=p),
    "nn.init": lambda p: nn.init.zeros_(p),
    "foreach": lambda p: torch._foreach_add_([p], 1.0),
    "copy_": lambda p: p.copy_(torch.ones_like(p)),
}


@pytest.mark.parametrize("name", list(WRITES))
def test_every_write_to_a_base_tensor_lands_in_its_private_copy(
    models_root: Path, name: str
) -> None:
    shared, segments = shared_on_segment(models_root, "fp32")
    before = digest(shared)
    worker: Any = attach(shared, segments)
    parameter = worker.model.layers[0].mlp.up_proj.weight
    expected = parameter.detach().clone()  # a plain tensor: what the write should do
    with torch.no_grad():
        WRITES[name](nn.Parameter(expected, requires_grad=False))
        WRITES[name](parameter)
    assert torch.equal(parameter, expected)
    assert not on_segment(parameter)
    assert on_segment(worker.model.layers[0].mlp.down_proj.weight)
    assert digest(shared) == before
    fresh: Any = attach(shared, segments)
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, shared_weight(shared))


def shared_weight(shared: Shared) -> torch.Tensor:
    """up_proj of layer 0 as the service's own model still has it."""
    entry = shared.handle.parameters["model.layers.0.mlp.up_proj.weight"]
    [described] = [e for e in shared.handle.entries if e.name == entry]
    [place] = [s for s in shared.handle.segments if s.name == described.segment]
    segment = shared.segments[place.fd_index - 1]
    raw = segment[described.offset : described.offset + described.nbytes]
    return raw.view(torch.float32).view(described.shape)


def test_an_alias_written_through_reads_what_it_wrote(models_root: Path) -> None:
    shared, segments = shared_on_segment(models_root, "fp32")
    worker: Any = attach(shared, segments)
    parameter = worker.lm_head.weight
    alias = parameter.data
    row = parameter[0]
    original = row.clone()
    with torch.no_grad():
        alias.add_(1.0)
    assert torch.equal(parameter, alias)
    assert torch.equal(row, original), "a view taken before the write reads the segment"
    with torch.no_grad():
        row.zero_()  # a stale view's write still goes to the parameter's copy
    assert not parameter[0].any()


def test_training_and_moves_keep_the_base_on_the_segment(models_root: Path) -> None:
    shared, segments = shared_on_segment(models_root, "fp32")
    worker: Any = attach(shared, segments)
    worker.to("cpu")
    worker.requires_grad_(False)
    peft_model = small_random_lora(worker).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    loss = peft_model(TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    base = [(n, p) for n, p in peft_model.named_parameters() if "lora_" not in n and p.numel()]
    assert base and all(on_segment(p) for _, p in base), [n for n, p in base if not on_segment(p)]
    assert type(loss) is torch.Tensor, "activations must stay plain tensors"


def test_a_read_write_mapping_is_reported_as_such(models_root: Path) -> None:
    """Where the read-only mapping is refused (a driver that does not support it), the
    handle's segments say so, and merges still go to private copies."""

    class ReadWrite(HostSegments):
        def open(self, segment: Any, fd: int, read_only: bool = True) -> torch.Tensor:
            return super().open(segment, fd, read_only=False)

    shared, _ = shared_on_segment(models_root, "fp32")
    before = digest(shared)
    worker: Any = attach_fd(shared.handle, shared.fd, ReadWrite(), shared.segment_fds)
    assert {s["read_only"] for s in worker.basehold_segments} == {False}
    assert mapping_permissions(worker.model.embed_tokens.weight) == "rw-s"
    with torch.no_grad():
        small_random_lora(worker).merge_and_unload()
    assert digest(shared) == before


def test_a_saved_or_copied_base_tensor_is_a_plain_one(models_root: Path, tmp_path: Path) -> None:
    """torch.load(weights_only=True) knows no copy-on-write class, and a copy is private:
    both see plain tensors; save_pretrained (safetensors) writes the base's values."""
    shared, segments = shared_on_segment(models_root, "fp32")
    worker: Any = attach(shared, segments)
    torch.save(worker.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert {type(t) for t in loaded.values()} == {torch.Tensor}
    assert torch.equal(loaded["lm_head.weight"], worker.lm_head.weight)
    copied = copy.deepcopy(worker.model.layers[0])
    assert type(copied.mlp.up_proj.weight) is nn.Parameter
    assert torch.equal(copied.mlp.up_proj.weight, worker.model.layers[0].mlp.up_proj.weight)
    worker.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, worker(TOKENS).logits)
