"""Worker side of "a job gets the GPU its base is on" (issue 26): `device_map: "this-gpu"`
becomes the UUID of the GPU this process sees, and a model on a GPU it does not see is a
clear error naming both. The GPUs are given through `service.worker.gpu`'s seam (a
`VisibleGpus` callable) where this box has none; the service, handles and HTTP are real."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.worker.client import BaseholdError, Client, GpuNotFound
from service.worker.gpu import VisibleGpus, check_segments, resolve, this_gpu, torch_gpus
from tests.common.handles.host_segments import STAND_IN_UUID
from tests.common.handles.test_segments import leased_on_stand_in
from tests.serving.test_server_e2e import Server

OURS = "GPU-0a1b2c3d-0000-4000-8000-00000000000a"
OTHER = "GPU-0a1b2c3d-0000-4000-8000-00000000000b"


def two_gpus() -> VisibleGpus:
    return VisibleGpus((OTHER, OURS), current=1)  # e.g. torchrun's LOCAL_RANK 1


def no_hardware() -> VisibleGpus:
    raise AssertionError("the GPUs were asked for a request that does not name this-gpu")


def test_this_gpu_is_the_current_device_by_uuid() -> None:
    body = {
        "source": "m",
        "device_map": {"model": "this-gpu", "lm_head": "cpu"},
        "max_memory": {"this-gpu": "10GiB"},
    }
    assert resolve(body, two_gpus) == {
        "source": "m",
        "device_map": {"model": f"cuda:{OURS}", "lm_head": "cpu"},
        "max_memory": {f"cuda:{OURS}": "10GiB"},
    }
    assert resolve({"source": "m", "device_map": "this-gpu"}, two_gpus)["device_map"] == (
        f"cuda:{OURS}"
    )
    assert resolve({"source": "m", "device_map": "cuda:0"}, no_hardware)["device_map"] == "cuda:0"


def test_no_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through torch itself: this box has no GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert torch_gpus() == VisibleGpus(())
    with pytest.raises(GpuNotFound) as raised:
        this_gpu()
    message = str(raised.value)
    assert "sees none" in message and "CUDA_VISIBLE_DEVICES=" in message
    assert "nvidia.com/gpu" in message


def test_a_segment_on_another_gpu_names_both(
    models_root: Path, tmp_path: Path, socket_path: Path
) -> None:
    """A real lease's handle on the host stand-in for device segments: the check passes
    where its GPU is visible, and otherwise names the model's GPU and this process's."""
    with leased_on_stand_in(models_root, tmp_path, socket_path) as (_, _, grant):
        check_segments(grant["handle"], VisibleGpus((OTHER, STAND_IN_UUID)))
        with pytest.raises(GpuNotFound) as raised:
            check_segments(grant["handle"], two_gpus())
        message = str(raised.value)
        assert STAND_IN_UUID in message and OURS in message and "this-gpu" in message
        with pytest.raises(GpuNotFound, match="this process sees no GPU"):
            check_segments(grant["handle"], VisibleGpus(()))


def test_ensure_asks_the_service_for_this_processs_gpu(live_server: Server) -> None:
    """End to end over HTTP: the Client sends the GPU's UUID, and the service (no GPU here)
    answers a 400 invalid_spec naming it."""
    with Client(live_server.url, gpus=two_gpus) as client, pytest.raises(BaseholdError) as raised:
        client.ensure({"source": "sshleifer/tiny-gpt2", "device_map": "this-gpu"}, timeout=5)
    assert raised.value.status == 400 and raised.value.code == "invalid_spec"
    assert OURS in raised.value.detail
