"""Device segments (the CUDA arena) without a GPU: the host stand-in drives the whole path
except the IPC calls; the real CudaSegments is checked where it needs no GPU."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from service.common.handles.descriptor import Handle, Provenance
from service.common.handles.devices import DEVICE_ALIGN, CudaSegments, SegmentUnavailable
from service.common.load.spec import Task
from service.common.protocol.held import Held
from service.loader.arena_placement import ArenaPlacement
from service.loader.footprint import all_tensors
from service.loader.share import share
from service.serving.app import create_app
from service.serving.leases.leases import LeaseTable
from service.serving.loaders.arenas import HeldArenas
from service.serving.settings import Settings
from service.serving.socket.server import Peer
from service.worker.attach import AttachError, attach_fd
from service.worker.client import LeaseLost
from service.worker.lease_state import guard_forward
from tests.common.handles.host_segments import HostSegments
from tests.common.handles.test_arena import QUANT
from tests.conftest import app_of, load
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

    worker: Any = attach_fd(handle, shared.fd, segments, shared.segment_fds)
    assert [s["read_only"] for s in worker.basehold_segments] == [True]  # stand-in: PROT_READ
    with torch.no_grad():
        assert torch.equal(worker(TOKENS).logits, before)
    # The worker opened the segment itself (its own mapping of the same memory): every
    # base tensor is a view of that one storage.
    storages = {t.untyped_storage().data_ptr() for _, t in all_tensors(worker) if t.numel()}
    assert len(storages) == 1 and storages != {segment.untyped_storage().data_ptr()}
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
    published, fd = segments.publish("cuda:3", segments.allocate(torch.device("cpu"), 8), 1)
    os.close(fd)
    return Handle.model_validate(
        {
            "model_id": "m",
            "arena": {"socket": SOCKET, "name": "m", "size": 0, "data_start": 4096},
            "socket_uid": os.getuid(),
            "segments": [published.model_copy(update={"device_uuid": device_uuid})],
            "entries": [],
            "parameters": {},
            "buffers": {},
            "config": {},
            "architecture": "LlamaForCausalLM",
            "dtype": "float32",
            "provenance": {"source": "m"},
            "torch_version": torch.__version__,
            "ipc_format": HostSegments.ipc_format,
        }
    )


def test_worker_without_that_gpu_gets_a_clear_error(models_root: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    shared = share(model, "m", SOCKET, HostSegments())
    as_cuda = shared.handle.model_copy(update={"ipc_format": CudaSegments.ipc_format})
    with pytest.raises(AttachError, match="cannot see"):
        attach_fd(as_cuda, shared.fd, CudaSegments(visible_uuids=list), shared.segment_fds)


def test_newer_handle_is_refused() -> None:
    handle = share_handle_on("GPU-x").model_copy(update={"version": 99})
    with pytest.raises(AttachError, match="upgrade basehold"):
        attach_fd(handle, -1)


def held_on_stand_in(models_root: Path) -> tuple[HeldArenas, int]:
    """What the service holds after a loader placed a Llama in a stand-in segment and
    exited: the fds it handed over (the loader's own are closed, its model gone). Returns
    the arenas and the segment fd's number."""
    placement = ArenaPlacement(Path(SOCKET), HostSegments())
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    placed = placement.place("m", "m", model, [], Provenance(source="m"))
    shared = placement.shared("m")
    assert shared is not None and len(shared.fds) == 2
    fds = [os.dup(fd) for fd in shared.fds]
    placement.release("m")
    del model, shared
    gc.collect()
    facts = Held(
        task=Task.CAUSAL_LM,
        architecture="LlamaForCausalLM",
        dtype="float32",
        parameters=0,
        resolved_revision=None,
        by_device={},
        device_map={},
        placed=placed,
        checkpoint=models_root / "llama",
        allowed=(models_root,),
    )
    arenas = HeldArenas()
    arenas.add("m", facts, fds, None)
    return arenas, fds[1]


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_segments_outlive_a_forced_unload_until_the_revoked_lease_expires(
    models_root: Path,
) -> None:
    arenas, segment_fd = held_on_stand_in(models_root)
    held = arenas.dup_fds("m")
    assert len(held) == 2  # the arena and its segment
    for fd in held:
        os.close(fd)
    until = datetime.now(timezone.utc) + timedelta(hours=1)
    arenas.release("m", keep_until=until)
    assert arenas.retired() == 1 and _open(segment_fd)
    assert arenas.collect(until - timedelta(seconds=1)) == 0 and _open(segment_fd)
    assert arenas.collect(until) == 1
    assert not _open(segment_fd) and arenas.retired() == 0


def test_plain_unload_frees_segments_at_once(models_root: Path) -> None:
    arenas, segment_fd = held_on_stand_in(models_root)
    arenas.release("m")
    assert not _open(segment_fd) and arenas.retired() == 0


@contextmanager
def leased_on_stand_in(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> Iterator[tuple[TestClient, str, dict[str, Any]]]:
    """An app with the host stand-in for device segments, a float32 Llama placed in
    them, and a lease on it (TTL 120 s): (client, model id, the lease's grant)."""
    settings = Settings(state_dir=tmp_path / "state", socket=socket_path, model_roots=[models_root])
    app = create_app(settings, segments=HostSegments())
    with TestClient(app, base_url="http://localhost") as client:
        status = load(client, source=str(models_root / "llama"), dtype="float32")
        assert status["shareable"] is True
        body = client.post(
            f"/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 120}
        ).json()
        assert [s["name"] for s in body["handle"]["segments"]] == ["cpu"]
        yield client, status["id"], body


def test_a_gpu_lease_from_another_pid_namespace_gets_its_segments(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    """Device segments travel as fds (CUDA VMM exports them as POSIX fds), which open in
    any PID namespace: a peer whose pid the service cannot see (0) gets the arena and the
    segment, like any other; the loader that made them is gone."""
    with leased_on_stand_in(models_root, tmp_path, socket_path) as (client, _, grant):
        lending = app_of(client).state.lending
        for peer in (Peer(0, 1000, 1000), Peer(4242, 1000, 1000)):
            fds = lending.arena_fds(grant["lease_id"], grant["secret"], peer)
            assert len(fds) == 2
            assert [os.readlink(f"/proc/self/fd/{fd}") for fd in fds][1].startswith(
                "/memfd:basehold-segment"
            )
            for fd in fds:
                os.close(fd)


def test_forced_unload_keeps_segments_for_the_lease_ttl(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    with leased_on_stand_in(models_root, tmp_path, socket_path) as (client, model_id, body):
        assert client.delete(f"/v1/models/{model_id}?force=true").status_code == 204
        placement: HeldArenas = app_of(client).state.placement
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


def test_another_torch_attaches_another_format_refuses(models_root: Path) -> None:
    """Segments are fds, not torch's IPC bytes: a worker with another torch build attaches;
    one that opens another format of segment is told so."""
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    with torch.no_grad():
        before = model(TOKENS).logits
    shared = share(model, "m", SOCKET, HostSegments())
    older = shared.handle.model_copy(update={"torch_version": "2.4.0+cu121"})
    worker: Any = attach_fd(older, shared.fd, HostSegments(), shared.segment_fds)
    with torch.no_grad():
        assert torch.equal(worker(TOKENS).logits, before)
    with pytest.raises(AttachError, match="format"):
        attach_fd(shared.handle, shared.fd, CudaSegments(visible_uuids=list))
    with pytest.raises(AttachError, match="segment fd"):
        attach_fd(shared.handle, shared.fd, HostSegments(), [])


def test_without_cuda_bindings_gpu_models_stay_private_with_the_reason() -> None:
    reason = CudaSegments().unavailable()
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        assert reason is not None and "pip install cuda-bindings" in reason
    else:
        assert reason is None


def test_a_dtype_the_arena_cannot_describe_keeps_the_model_private(models_root: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(models_root / "llama", device_map="cpu")
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.float8_e4m3fn)
    placed = ArenaPlacement(Path(SOCKET)).place("m", "m", model, [], Provenance(source="m"))
    assert placed.shareable is False
    assert placed.reason is not None and "float8_e4m3fn" in placed.reason


@pytest.mark.parametrize(("grace", "retired"), [(60.0, 1), (0.0, 0)])
def test_a_plain_unload_right_after_a_release_keeps_segments_for_the_grace(
    models_root: Path, tmp_path: Path, socket_path: Path, grace: float, retired: int
) -> None:
    settings = Settings(
        state_dir=tmp_path / "state",
        socket=socket_path,
        model_roots=[models_root],
        segment_grace_seconds=grace,
    )
    app = create_app(settings, segments=HostSegments())
    with TestClient(app, base_url="http://localhost") as client:
        status = load(client, source=str(models_root / "llama"), dtype="float32")
        body = client.post(
            f"/v1/models/{status['id']}/leases", json={"holder": "w", "ttl_seconds": 120}
        ).json()
        secret = {"X-Lease-Secret": body["secret"]}
        assert client.delete(f"/v1/leases/{body['lease_id']}", headers=secret).status_code == 204
        assert client.delete(f"/v1/models/{status['id']}").status_code == 204
        placement: HeldArenas = app.state.placement
        assert placement.retired() == retired
        assert placement.collect(datetime.now(timezone.utc) + timedelta(seconds=61)) == retired


def test_expired_leases_hold_segments_for_one_more_ttl() -> None:
    table = LeaseTable(grace_seconds=5)
    lease, _ = table.grant("m", "w", ttl_seconds=1)
    assert table.hold_until("m") is None
    deadline = time.monotonic() + 30
    while not (expired := table.expire()):  # polled: the lease runs out after its 1 s TTL
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.02)
    assert [e.id for e in expired] == [lease.id]
    held = table.hold_until("m")
    assert held is not None and 0.5 < (held - datetime.now(timezone.utc)).total_seconds() <= 1
    released, _ = table.grant("n", "w", ttl_seconds=60)
    table.release(released.id)
    until = table.hold_until("n")
    assert until is not None and 4 < (until - datetime.now(timezone.utc)).total_seconds() <= 5


def test_without_a_driver_a_vmm_segment_is_refused_with_the_reason() -> None:
    """The real CUDA VMM path, as far as a machine without a GPU can take it: the bindings
    load, the driver does not, and the error says so (a load then keeps the model private
    with that reason)."""
    pytest.importorskip("cuda.bindings.driver")
    from service.common.handles import vmm

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.py checks the real path")
    with pytest.raises(vmm.VmmUnavailable, match="driver"):
        vmm.create(0, 1024)
    with pytest.raises(torch.OutOfMemoryError, match="driver"):
        CudaSegments().allocate(torch.device("cuda", 0), 1024)
