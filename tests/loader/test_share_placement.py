"""Placing a model in device segments, rehearsed on the host stand-in (no GPU here): the
sources are freed as they move, so the "device" never holds the model twice; a segment
that cannot be exported leaves the model private with the reason; the estimate prices the
peak the placement reaches."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from service.common.handles.descriptor import DeviceSegment, Provenance
from service.common.handles.devices import DEVICE_ALIGN
from service.common.handles.vmm import VmmUnavailable
from service.common.load.spec import DType, LoadRequest, Task
from service.common.protocol.held import Placed
from service.common.torch_cuda import TorchCuda
from service.loader import segment_chunks, segment_fill
from service.loader.arena_placement import ArenaPlacement
from service.loader.estimate import estimate_model, skeleton
from service.loader.footprint import all_tensors
from service.loader.share import share
from service.serving.app import create_app
from service.serving.settings import Settings
from service.worker.attach import attach_fd
from tests import checkpoints
from tests.common.handles.host_segments import HostSegments
from tests.common.handles.test_arena import QUANT
from tests.conftest import load

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])
SOCKET = "/nonexistent/basehold.sock"  # in-process attaches take the fd directly


class Sources:
    """The model's tensors re-homed into numpy buffers whose release is observed: `live`
    is how many bytes of them are still allocated (the "device" copy of the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.live = 0
        self.sizes: list[int] = []
        moved: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in moved:
                    moved[id(param)] = param
                    param.data = self._adopt(param.data)
            for leaf, buffer in module._buffers.items():
                if buffer is not None:
                    if id(buffer) not in moved:
                        moved[id(buffer)] = self._adopt(buffer)
                    module._buffers[leaf] = moved[id(buffer)]
        self.model_bytes = self.live

    def _adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        array = numpy.empty(max(nbytes, 1), dtype=numpy.uint8)
        copy = torch.from_numpy(array)[:nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        self.live += nbytes
        self.sizes.append(nbytes)
        weakref.finalize(array, self._freed, nbytes)
        return copy

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


class Measured(HostSegments):
    """The stand-in, noting at each allocation what the "device" holds: the segments made
    so far, this one, and the sources still alive."""

    def __init__(self, sources: Sources) -> None:
        super().__init__()
        self.sources = sources
        self.segment_bytes = 0
        self.peak = 0
        self.live_at_allocation: list[int] = []

    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        self.segment_bytes += nbytes
        self.live_at_allocation.append(self.sources.live)
        self.peak = max(self.peak, self.segment_bytes + self.sources.live)
        return super().allocate(device, nbytes)


def _model(path: Path, kind: str = "fp32") -> Any:
    return AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", **{"dtype": torch.float32, **QUANT[kind]}
    )


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(TOKENS).logits
    return logits


@pytest.fixture(scope="module")
def wider(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~28 MB of float32 Llama whose shapes bitsandbytes' CPU 4-bit kernels accept."""
    return checkpoints.llama(
        tmp_path_factory.mktemp("wider") / "llama", hidden=384, layers=3, vocab=4000
    )


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_placing_frees_each_source_as_it_moves(wider: Path, kind: str) -> None:
    model = _model(wider, kind)
    # bitsandbytes' CPU kernels repack 4-bit weights at the first forward, which the loader
    # never runs before placing: the 4-bit model is compared after placing only.
    before = _logits(model) if kind == "fp32" else None
    sources = Sources(model)
    gc.collect()
    model_bytes, largest = sources.model_bytes, max(sources.sizes)
    devices = Measured(sources)

    shared = share(model, "m", SOCKET, devices)

    # The old placement copied into one segment of the model's size while every source
    # was alive: twice the model.
    assert devices.peak <= model_bytes + largest + 0.05 * model_bytes, (
        f"peak {devices.peak} for a model of {model_bytes} (largest tensor {largest})"
    )
    assert sources.live == 0, "a source outlived its move into the segments"
    freeing = devices.live_at_allocation
    assert freeing == sorted(set(freeing), reverse=True), (
        f"sources not freed as they move: {freeing}"
    )
    assert len(shared.segments) > 1 and len(shared.fds) == 1 + len(shared.segments)
    names = [s.name for s in shared.handle.segments]
    assert names == [f"cpu/{i}" for i in range(len(names))]
    assert [s.fd_index for s in shared.handle.segments] == list(range(1, len(names) + 1))
    assert devices.emptied == len(names) + 1  # before each segment, and once at the end
    inside = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in shared.segments]
    assert all(any(lo <= t.data_ptr() < hi for lo, hi in inside) for _, t in all_tensors(model)), (
        "a tensor was left outside the segments"
    )
    placed = _logits(model)
    assert before is None or torch.equal(placed, before)

    worker = attach_fd(shared.handle, shared.fd, HostSegments(), shared.segment_fds)
    assert torch.equal(_logits(worker), placed)
    shared.close()


def test_where_torch_keeps_freed_memory_the_rest_waits_in_host_memory(
    bigger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's CUDA cache cannot give back part of one big allocation (transformers makes
    one for the whole model): the stand-in for that cache says it keeps every freed byte,
    so after the first segment the tensors not yet moved leave the device at once."""
    model = _model(bigger)
    before = _logits(model)
    sources = Sources(model)
    devices = Measured(sources)
    # A cache that gives nothing back keeps every byte of the sources freed so far.
    freed = lambda device: sources.model_bytes - sources.live  # noqa: E731
    monkeypatch.setattr(segment_fill, "allocator_cached", freed)

    shared = share(model, "m", SOCKET, devices)

    first, *later = devices.live_at_allocation
    assert first == sources.model_bytes and later and set(later) == {0}
    assert torch.equal(_logits(model), before)
    worker = attach_fd(shared.handle, shared.fd, HostSegments(), shared.segment_fds)
    assert torch.equal(_logits(worker), before)
    shared.close()


class ExportFails(HostSegments):
    """A driver that makes segments but refuses to export one (cuMemExportToShareableHandle
    failing, as on a GPU or driver without POSIX-fd handles): the second one, so one
    segment is already out when it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.published = 0

    def publish(self, name: str, segment: torch.Tensor, fd_index: int) -> tuple[DeviceSegment, int]:
        self.published += 1
        if self.published == 2:
            raise VmmUnavailable("export failed: CUDA_ERROR_NOT_SUPPORTED")
        return super().publish(name, segment, fd_index)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_failed_export_keeps_the_model_private_with_the_reason(bigger: Path) -> None:
    model = _model(bigger)
    before = _logits(model)
    fds = _fds()
    placement = ArenaPlacement(Path(SOCKET), ExportFails())
    placed: Placed = placement.place("m", "m", model, [], Provenance(source="m"))
    assert placed.shareable is False and placed.handle is None
    assert placed.reason is not None
    assert "could not be exported" in placed.reason and "CUDA_ERROR_NOT_SUPPORTED" in placed.reason
    assert placement.shared("m") is None
    assert torch.equal(_logits(model), before)  # partly in the first segment, still whole
    del model
    gc.collect()
    assert _fds() <= fds, "an arena or segment fd leaked"


def test_a_failed_export_shows_in_the_models_status(
    bigger: Path, tmp_path: Path, socket_path: Path
) -> None:
    settings = Settings(
        state_dir=tmp_path / "state", socket=socket_path, model_roots=[bigger.parent]
    )
    app = create_app(settings, segments=ExportFails())
    with TestClient(app, base_url="http://localhost") as client:
        status = load(client, source=str(bigger), dtype="float32")
        assert status["shareable"] is False
        assert "could not be exported" in status["shareable_reason"]
        assert "CUDA_ERROR_NOT_SUPPORTED" in status["shareable_reason"]


def _estimate(path: Path, device_map: str, **spec: Any) -> Any:
    request = LoadRequest(source=str(path), device_map=device_map, dtype=DType.FLOAT32, **spec)
    config = AutoConfig.from_pretrained(path)
    return estimate_model(skeleton(request, config, Task.CAUSAL_LM), request, TorchCuda())


def test_admission_prices_the_placement_peak_on_the_gpu(bigger: Path) -> None:
    on_cpu = _estimate(bigger, "cpu")
    on_gpu = _estimate(bigger, "cuda:0")
    model_bytes = on_cpu.by_device["cpu"]
    assert on_cpu.placing_bytes == 0
    assert on_gpu.placing_bytes > 0
    assert on_gpu.by_device == {"cuda:0": model_bytes + on_gpu.placing_bytes}
    assert on_gpu.total_bytes == model_bytes
    model = _model(bigger)
    sizes = [(n, t.numel() * t.element_size()) for n, t in all_tensors(model)]
    largest = max(s for _, s in sizes)
    # One segment's worth (the largest tensor here) plus each segment's rounding.
    rounding = len(segment_chunks.cut(sizes, DEVICE_ALIGN)) * segment_chunks.GRANULARITY
    assert largest <= on_gpu.placing_bytes <= largest + 0.05 * model_bytes + rounding


def test_a_model_of_many_small_tensors_fits_one_message_of_fds() -> None:
    """Greedy groups of tensors that each just miss the next one's room make about twice
    CHUNKS segments; a worker takes at most 64 fds at once."""
    limit = segment_chunks.capacity(64 * 2**30, 0)
    sizes = [(f"t{i}", limit // 2 + 1) for i in range(130)]
    assert len(segment_chunks.groups(sizes, limit, DEVICE_ALIGN)) > 64
    segments = segment_chunks.cut(sizes, DEVICE_ALIGN)
    assert len(segments) <= segment_chunks.MAX_SEGMENTS
    assert [n for group in segments for n in group] == [n for n, _ in sizes]


def test_eight_bit_models_stay_private_and_are_priced_without_placement(bigger: Path) -> None:
    eight_bit = _estimate(bigger, "cuda:0", quantization={"method": "bnb-8bit"})
    assert eight_bit.placing_bytes == 0
