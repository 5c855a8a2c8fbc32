"""Device segments (the CUDA arena) without a GPU: the host stand-in drives the whole path
except the IPC calls; the real CudaSegments is checked where it needs no GPU."""

from __future__ import annotations

import gc
import os
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from service.app import create_app
from service.client import LeaseLost, guard_forward
from service.handles.attach import AttachError, attach_fd
from service.handles.descriptor import Handle
from service.handles.devices import DEVICE_ALIGN, CudaSegments, SegmentUnavailable
from service.handles.placement import ArenaPlacement
from service.handles.share import share
from service.loading.sources import Provenance
from service.memory.footprint import all_tensors
from service.settings import Settings
from tests.conftest import load
from tests.handles.host_segments import HostSegments
from tests.handles.test_arena import QUANT
from tests.reference import from_pretrained

TOKENS = torch.tensor([[1, 2, 3, 4, 5]])
SOCKET = "/nonexistent/basehold.sock"  # in-process attaches take the fd directly


def outside(model: nn.Module, segment: torch.Tensor) -> list[str]:
    start = segment.data_ptr()
    end = start + segment.numel()
    return [n for n, t in all_tensors(model) if t.numel() and not start <= t.data_ptr() < end]


@pytest.mark.parametrize("kind", ["fp32", "fp4-double-quant"])
def test_model_moves_into_one_segment_and_attaches(models_root: Path, kind: str) -> None:
    model = from_pretrained(
        AutoModelForCausalLM,
        models_root / "llama-tied",
        device_map="cpu",
        **{"dtype": torch.float32, **QUANT[kind]},
    )
    with torch.no_grad():
        before = model(TOKENS).logits
    segments = HostSegments()
    shared = share(model, "m", SOCKET, segments)
    [segment] = shared.segments
    handle = Handle.model_validate_json(shared.handle.model_dump_json())
    assert [s.name for s in handle.segments] == ["cpu"]
    assert all(e.segment == "cpu" and e.offset % DEVICE_ALIGN == 0 for e in handle.entries)
    with safe_open(f"/proc/self/fd/{shared.fd}", framework="pt") as empty:
        assert list(empty.keys()) == []  # every tensor went to the segment
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, before)
    assert outside(model, segment) == [], "service tensors are not in the segment"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert segments.emptied == 1

    worker = attach_fd(handle, shared.fd, segments)
    with torch.no_grad():
        assert torch.equal(worker(TOKENS).logits, before)
    assert outside(worker, segment) == []
    assert worker.lm_head.weight is worker.model.embed_tokens.weight


def test_gpu_is_found_by_uuid_whatever_its_index() -> None:
    segments = CudaSegments(visible_uuids=lambda: ["GPU-aaa", "GPU-bbb"])
    handle = share_handle_on("GPU-bbb")
    assert segments.local_index(handle.segments[0]) == 1
    hidden = CudaSegments(visible_uuids=lambda: ["GPU-aaa"])
    with pytest.raises(SegmentUnavailable, match=r"GPU-bbb.*CUDA_VISIBLE_DEVICES"):
        hidden.local_index(handle.segments[0])


def share_handle_on(device_uuid: str) -> Handle:
    segments = HostSegments()
    published = segments.publish("cuda:3", torch.zeros(8, dtype=torch.uint8))
    return Handle.model_validate(
        {
            "model_id": "m",
            "arena": {"socket": SOCKET, "name": "m", "size": 0, "data_start": 4096},
            "segments": [published.model_copy(update={"device_uuid": device_uuid})],
            "entries": [],
            "parameters": {},
            "buffers": {},
            "config": {},
            "architecture": "LlamaForCausalLM",
            "dtype": "float32",
            "provenance": {"source": "m"},
        }
    )


def test_worker_without_that_gpu_gets_a_clear_error(models_root: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    shared = share(model, "m", SOCKET, HostSegments())
    with pytest.raises(AttachError, match="cannot see"):
        attach_fd(shared.handle, shared.fd, CudaSegments(visible_uuids=list))


def test_newer_handle_is_refused() -> None:
    handle = share_handle_on("GPU-x").model_copy(update={"version": 99})
    with pytest.raises(AttachError, match="upgrade basehold"):
        attach_fd(handle, -1)


def placed(models_root: Path) -> tuple[ArenaPlacement, weakref.ref[torch.Tensor]]:
    """A placement holding model "m" in a segment, and a weak reference to that segment
    (the model itself is dropped: only the placement keeps the segment alive)."""
    placement = ArenaPlacement(Path(SOCKET), HostSegments())
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    placement.place("m", "m", model, [], Provenance(source="m"))
    return placement, weakref.ref(placement._held["m"].segments[0])


def test_segments_outlive_a_forced_unload_until_the_revoked_lease_expires(
    models_root: Path,
) -> None:
    placement, alive = placed(models_root)
    until = datetime.now(timezone.utc) + timedelta(hours=1)
    placement.release("m", keep_until=until)
    gc.collect()
    assert placement.retired() == 1 and alive() is not None
    assert placement.collect(until - timedelta(seconds=1)) == 0 and alive() is not None
    assert placement.collect(until) == 1
    gc.collect()
    assert alive() is None and placement.retired() == 0


def test_plain_unload_frees_segments_at_once(models_root: Path) -> None:
    placement, alive = placed(models_root)
    placement.release("m")
    gc.collect()
    assert alive() is None and placement.retired() == 0


def test_forced_unload_keeps_segments_for_the_lease_ttl(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, segments=HostSegments())
    with TestClient(app, base_url="http://localhost") as client:
        status = load(client, source=str(models_root / "llama"), dtype="float32")
        assert status["shareable"] is True
        body = client.post(
            f"/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 120}
        ).json()
        assert [s["name"] for s in body["handle"]["segments"]] == ["cpu"]
        assert client.delete(f"/v1/models/{status['id']}?force=true").status_code == 204
        placement: ArenaPlacement = app.state.placement
        assert placement.retired() == 1
        expires = datetime.fromisoformat(body["expires_at"])
        assert placement.collect(expires - timedelta(seconds=1)) == 0
        assert placement.collect(expires) == 1


def test_forward_is_refused_once_the_lease_is_lost() -> None:
    model = nn.Linear(2, 2)
    reason: list[str] = []
    guard_forward(model, lambda: reason[0] if reason else None)
    model(torch.ones(1, 2))
    reason.append("lease lease-1 on m was lost: revoked")
    with pytest.raises(LeaseLost, match="revoked"):
        model(torch.ones(1, 2))


class FullDevice(HostSegments):
    def allocate(self, device: torch.device, nbytes: int) -> torch.Tensor:
        raise torch.OutOfMemoryError(f"tried to allocate {nbytes} bytes")


def test_no_room_for_the_segment_keeps_the_model_private(models_root: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    with torch.no_grad():
        before = model(TOKENS).logits
    fds = set(os.listdir("/proc/self/fd"))
    placed = ArenaPlacement(Path(SOCKET), FullDevice()).place(
        "m", "m", model, [], Provenance(source="m")
    )
    assert placed.shareable is False
    assert placed.reason is not None and "no room for the shareable copy" in placed.reason
    assert set(os.listdir("/proc/self/fd")) <= fds  # the arena's memfd was closed
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, before)
