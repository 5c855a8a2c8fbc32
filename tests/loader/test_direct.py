"""Direct placement: a CPU load that keeps the checkpoint's tensors as they are gets the
files' bytes copied into its arena by the kernel while transformers loads, and the model
re-pointed there; anything else takes the usual path, with the copy dropped first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from service.common.handles.memfd import is_sealed
from service.common.load.progress import Progress
from service.common.load.spec import LoadRequest, Task
from service.loader import direct
from service.loader.arena_placement import ArenaPlacement
from service.loader.checkpoint import read_safetensors_header
from service.loader.direct import Prefetch
from service.loader.pipeline import LoadContext, load_and_place, prepare
from service.loader.share import Shared, share
from service.worker.attach import attach_fd
from tests import checkpoints
from tests.serving.api.test_memory import FakeCuda

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])
SOCKET = "/nonexistent/basehold.sock"


def _spec(path: Path, **fields: Any) -> LoadRequest:
    return LoadRequest.model_validate({"source": str(path), "device_map": "cpu", **fields})


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _load(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cpu")


def _placed(path: Path, spec: LoadRequest, model: Any) -> tuple[Shared, Prefetch | None]:
    files = _files(path)
    prefetch = Prefetch.start("m", spec, model.config, files)
    try:
        return share(model, "m", SOCKET, prefetch=prefetch), prefetch
    finally:
        if prefetch is not None:
            prefetch.close()


def _arena_bytes(shared: Shared) -> bytes:
    return os.pread(shared.fd, shared.arena.size, 0)


def arena_context(tmp_path: Path) -> LoadContext:
    """A loader's context for checkpoints under `tmp_path/models`, placing into arenas."""
    return LoadContext(
        roots=[tmp_path / "models"],
        offload_root=tmp_path / "offload",
        placement=ArenaPlacement(Path(SOCKET)),
        cuda=FakeCuda(0),
    )


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama saved in several shards."""
    path = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    model = _load(checkpoints.llama(path / "src"))
    model.save_pretrained(path / "llama", max_shard_size="100KB")
    return path / "llama"


def test_the_arena_holds_the_files_bytes_where_the_files_have_them(tmp_path: Path) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    reference = _logits(_load(path))
    model = _load(path)
    shared, _ = _placed(path, _spec(path, dtype="float32"), model)
    file = _files(path)[0]
    header = read_safetensors_header(file)
    data = file.read_bytes()[
        file.stat().st_size
        - sum(
            e["data_offsets"][1] - e["data_offsets"][0]  # type: ignore[index]
            for n, e in header.items()
            if n != "__metadata__"
        ) :
    ]
    arena = _arena_bytes(shared)
    start = shared.arena.data_start
    assert arena[start : start + len(data)] == data  # copied verbatim, not re-laid out
    offsets = {e.name: e.offset for e in shared.arena.entries}
    for name, entry in header.items():
        if name != "__metadata__":
            assert offsets[name] == entry["data_offsets"][0]  # type: ignore[index]
    assert is_sealed(shared.fd)
    # A valid safetensors file with every tensor the model holds, the computed buffers too.
    held = load_safetensors(arena)
    for name, tensor in model.state_dict().items():
        assert torch.equal(held[name], tensor), name
    assert "model.rotary_emb.inv_freq" in {e.name for e in shared.arena.entries}
    assert torch.equal(_logits(model), reference)
    attached = attach_fd(shared.handle, shared.fd)
    assert torch.equal(_logits(attached), reference)
    shared.close()


def test_shards_are_laid_end_to_end_with_what_follows_aligned(sharded: Path) -> None:
    assert len(_files(sharded)) > 2
    reference = _logits(_load(sharded))
    model = _load(sharded)
    shared, _ = _placed(sharded, _spec(sharded), model)
    arena = _arena_bytes(shared)
    start = shared.arena.data_start
    base = 0
    for file in _files(sharded):
        size = sum(
            e["data_offsets"][1] - e["data_offsets"][0]  # type: ignore[index]
            for n, e in read_safetensors_header(file).items()
            if n != "__metadata__"
        )
        raw = file.read_bytes()
        assert arena[start + base : start + base + size] == raw[len(raw) - size :]
        base += size
    for entry in shared.arena.entries:
        assert entry.offset % torch.empty((), dtype=_DTYPES[entry.dtype]).element_size() == 0
    assert torch.equal(_logits(model), reference)
    assert torch.equal(_logits(attach_fd(shared.handle, shared.fd)), reference)
    shared.close()


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8}


def test_a_cast_does_not_copy_the_files_at_all(tmp_path: Path) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    model = _load(path, torch.bfloat16)
    assert Prefetch.start("m", _spec(path, dtype="bfloat16"), model.config, _files(path)) is None


def test_a_checkpoint_tensor_the_model_drops_sends_the_load_the_usual_way(
    tmp_path: Path,
) -> None:
    """transformers ignores a tensor the architecture has no place for: holding its bytes
    would waste memory, so the copy is dropped (its memfd closed) and the arena written."""
    path = checkpoints.llama(tmp_path / "llama")
    file = _files(path)[0]
    tensors = load_safetensors(file.read_bytes())
    tensors["unused.extra"] = torch.ones(1000)
    save_file(tensors, str(file), metadata={"format": "pt"})
    reference = _logits(_load(path))
    model = _load(path)
    prefetch = Prefetch.start("m", _spec(path), model.config, _files(path))
    assert prefetch is not None and prefetch.fd is not None
    copy = os.fstat(prefetch.fd).st_ino
    shared = share(model, "m", SOCKET, prefetch=prefetch)
    assert prefetch.fd is None  # dropped before the arena was written: never two copies
    assert os.fstat(shared.fd).st_ino != copy
    names = {e.name for e in shared.arena.entries}
    assert "unused.extra" not in names
    assert torch.equal(_logits(attach_fd(shared.handle, shared.fd)), reference)
    assert copy not in _memfd_inodes()
    shared.close()


def _memfd_inodes() -> set[int]:
    """The inodes of every memfd this process holds an fd or a mapping of."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                held.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            continue
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/memfd:"):
            held.add(int(parts[4]))
    return held


def test_a_file_changed_during_the_copy_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    reference = _logits(_load(path))
    model = _load(path)
    prefetch = Prefetch.start("m", _spec(path), model.config, _files(path))
    assert prefetch is not None
    file = _files(path)[0]
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with caplog.at_level("WARNING", logger="basehold.loading"):
        shared = share(model, "m", SOCKET, prefetch=prefetch)
    prefetch.close()
    assert "changed while it was copied" in caplog.text
    assert torch.equal(_logits(attach_fd(shared.handle, shared.fd)), reference)
    shared.close()


@pytest.mark.parametrize(
    ("fields", "gpus"),
    [
        ({"quantization": {"method": "bnb-4bit"}}, 0),
        ({"num_labels": 3, "task": "seq-cls"}, 0),
        ({"offload": True}, 0),
        ({"device_map": "auto"}, 1),
        ({"device_map": "cuda:0"}, 0),
    ],
)
def test_loads_transformers_converts_or_places_elsewhere_are_not_prefetched(
    tmp_path: Path, fields: dict[str, Any], gpus: int
) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    model = _load(path)
    spec = _spec(path, **fields)
    assert not direct.applies(spec, model.config, Task.CAUSAL_LM, _files(path), FakeCuda(gpus))
    assert direct.applies(_spec(path), model.config, Task.CAUSAL_LM, _files(path), FakeCuda(0))


class AskedNothing(FakeCuda):
    """A GPU machine whose CUDA must not be asked (it would start CUDA in a CPU load)."""

    def device_count(self) -> int:
        raise AssertionError("a load on the CPU asked CUDA for its devices")


def test_a_load_on_the_cpu_never_asks_cuda(tmp_path: Path) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    config = _load(path).config
    assert direct.applies(_spec(path), config, Task.CAUSAL_LM, _files(path), AskedNothing(1))


def test_a_checkpoint_quantized_in_its_files_is_not_prefetched(tmp_path: Path) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    config = _load(path).config
    config.quantization_config = {"quant_method": "fp8"}
    assert not direct.applies(_spec(path), config, Task.CAUSAL_LM, _files(path), FakeCuda(0))


def test_a_16_bit_load_of_a_model_that_keeps_modules_in_float32_is_not_prefetched(
    tmp_path: Path,
) -> None:
    """T5 keeps its feed-forward output in float32 under float16: transformers casts."""
    path = checkpoints.t5(tmp_path / "t5")
    config = AutoConfig.from_pretrained(path)
    files = _files(path)
    half = _spec(path, dtype="float16")
    assert not direct.applies(half, config, Task.SEQ2SEQ_LM, files, FakeCuda(0))
    assert direct.applies(_spec(path, dtype="float32"), config, Task.SEQ2SEQ_LM, files, FakeCuda(0))


def test_a_tensor_changed_in_place_before_placement_keeps_its_new_bytes(tmp_path: Path) -> None:
    """transformers' mapping of the file is private: a tensor written in place holds bytes
    the file (and so the copy) does not, and the arena must hold the tensor's."""
    path = checkpoints.llama(tmp_path / "llama")
    model = _load(path)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    expected = _logits(model)
    shared, _ = _placed(path, _spec(path), model)
    assert torch.equal(_logits(attach_fd(shared.handle, shared.fd)), expected)
    shared.close()


def test_a_closed_prefetch_frees_its_memfd(tmp_path: Path) -> None:
    path = checkpoints.llama(tmp_path / "llama")
    model = _load(path)
    prefetch = Prefetch.start("m", _spec(path), model.config, _files(path))
    assert prefetch is not None and prefetch.fd is not None
    copy = os.fstat(prefetch.fd).st_ino
    prefetch.close()
    prefetch.close()
    assert copy not in _memfd_inodes()


def test_what_follows_the_files_is_aligned_with_a_padding_entry() -> None:
    """safetensors allows no holes: a float32 buffer after files whose data ends on an odd
    count of bfloat16 values starts after a two-byte padding entry."""
    entries = direct.appended([("b", torch.zeros(3)), ("a", torch.zeros(2, dtype=torch.int8))], 6)
    assert [(e.name, e.dtype, e.offset, e.nbytes) for e in entries] == [
        ("__basehold_padding__", "U8", 6, 2),
        ("b", "F32", 8, 12),
        ("a", "I8", 20, 2),
    ]
    assert direct.appended([("b", torch.zeros(3))], 8)[0].offset == 8


def test_a_checkpoint_whose_tensors_transformers_fuses_is_not_prefetched(tmp_path: Path) -> None:
    path = checkpoints.mixtral(tmp_path / "mixtral")  # one tensor per expert in the files
    config = AutoConfig.from_pretrained(path)
    assert not direct.applies(_spec(path), config, Task.CAUSAL_LM, _files(path), FakeCuda(0))


def test_a_converter_named_by_class_counts_only_where_it_takes_the_files_tensors(
    tmp_path: Path,
) -> None:
    """Dinov2's table is under its base class's name (`Dinov2Model`), not its model type,
    and its converter splits `mlp.weights_in`, which only a SwiGLU checkpoint has: the
    others' tensors are only renamed, so they are copied ahead."""
    swiglu = checkpoints.dinov2(tmp_path / "swiglu")
    config = AutoConfig.from_pretrained(swiglu)
    assert not direct.applies(_spec(swiglu), config, Task.BASE, _files(swiglu), FakeCuda(0))
    plain = checkpoints.dinov2(tmp_path / "plain", swiglu=False)
    config = AutoConfig.from_pretrained(plain)
    assert direct.applies(_spec(plain), config, Task.BASE, _files(plain), FakeCuda(0))


def test_a_load_through_the_pipeline_is_placed_directly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole loader path (prepare, load_and_place, ArenaPlacement): the arena keeps the
    checkpoint's layout, so the copy made while transformers loaded is the arena."""
    path = checkpoints.llama(tmp_path / "models" / "llama")
    ctx = arena_context(tmp_path)
    spec = LoadRequest.model_validate({"source": str(path), "dtype": "auto"})
    with caplog.at_level("DEBUG", logger="basehold.loading"):
        load_and_place("m", "load-1", prepare(spec, None, ctx), ctx, Progress())
    assert "load-1: placed directly" in caplog.text
    placement = ctx.placement
    assert isinstance(placement, ArenaPlacement)
    shared = placement.shared("load-1")
    assert shared is not None
    offsets = {e.name: e.offset for e in shared.arena.entries}
    header = read_safetensors_header(_files(path)[0])
    for name, entry in header.items():
        if name != "__metadata__":
            assert offsets[name] == entry["data_offsets"][0]  # type: ignore[index]
    placement.release("load-1")
