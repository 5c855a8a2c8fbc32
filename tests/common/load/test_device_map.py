from __future__ import annotations

import pytest

from service.common.errors import InvalidSpec
from service.common.load.device_map import (
    accelerate_device_map,
    accelerate_max_memory,
    normalize_device_map,
    normalize_max_memory,
)


def test_cuda_devices_validated_against_the_node() -> None:
    assert normalize_device_map("cuda:1", False, cuda_count=2) == "cuda:1"
    with pytest.raises(InvalidSpec, match="this node has 2"):
        normalize_device_map("cuda:2", False, cuda_count=2)


def test_dict_normalized_and_sorted() -> None:
    result = normalize_device_map({"lm_head": 0, "model": "cpu"}, False, cuda_count=1)
    assert result == {"lm_head": "cuda:0", "model": "cpu"}
    assert accelerate_device_map(result) == {"lm_head": 0, "model": "cpu"}


def test_max_memory_in_bytes_with_gpu_indices() -> None:
    result = normalize_max_memory({"cuda:0": "1GiB", "cpu": "2GB"}, "auto", cuda_count=1)
    assert result == {"0": 1 << 30, "cpu": 2_000_000_000}
    assert accelerate_max_memory(result) == {0: 1 << 30, "cpu": 2_000_000_000}


def test_unknown_device() -> None:
    with pytest.raises(InvalidSpec, match="not a device"):
        normalize_device_map({"model": "tpu"}, False, cuda_count=0)


UUIDS = ("GPU-0a1b2c3d-0000-4000-8000-000000000001", "GPU-0a1b2c3d-0000-4000-8000-000000000002")


@pytest.mark.parametrize(
    "named",
    [
        f"cuda:{UUIDS[1]}",
        UUIDS[1],
        f"cuda:{UUIDS[1].upper()}",
        # torch's device properties write the UUID without NVML's "GPU-" prefix
        f"cuda:GPU-{UUIDS[1].removeprefix('GPU-').upper()}",
    ],
)
def test_a_gpu_named_by_uuid_is_its_index(named: str) -> None:
    """One held model for `cuda:GPU-…` and the `cuda:N` it is in the serving process."""
    assert normalize_device_map(named, False, cuda_count=2, uuids=UUIDS) == "cuda:1"
    assert normalize_device_map({"model": named, "lm_head": "cpu"}, False, 2, UUIDS) == {
        "lm_head": "cpu",
        "model": "cuda:1",
    }
    assert normalize_max_memory({named: "1GiB"}, "auto", 2, UUIDS) == {"1": 1 << 30}


def test_a_gpu_the_node_does_not_have_names_it_and_the_ones_it_has() -> None:
    missing = "GPU-ffffffff-0000-4000-8000-00000000000f"
    with pytest.raises(InvalidSpec) as raised:
        normalize_device_map(f"cuda:{missing}", False, cuda_count=2, uuids=UUIDS)
    message = raised.value.message
    assert missing in message and f"cuda:0 = {UUIDS[0]}" in message and "nvidia-smi -L" in message
    with pytest.raises(InvalidSpec, match="it sees no GPU"):
        normalize_device_map(f"cuda:{missing}", False, cuda_count=0)


def test_mig_uuids_are_devices() -> None:
    mig = "MIG-3f9d2c1e-7a6b-4c5d-8e9f-0a1b2c3d4e5f"
    old_mig = "MIG-GPU-3f9d2c1e-7a6b-4c5d-8e9f-0a1b2c3d4e5f/7/0"
    for named in (mig, old_mig):
        assert normalize_device_map(f"cuda:{named}", False, 1, (named,)) == "cuda:0"


@pytest.mark.parametrize("value", ["cuda:GPU-1234", "cuda:GPU-not-a-uuid", "GPU-"])
def test_malformed_uuids_are_not_devices(value: str) -> None:
    with pytest.raises(InvalidSpec, match="is not a device"):
        normalize_device_map(value, False, cuda_count=2, uuids=UUIDS)


def test_this_gpu_is_resolved_by_the_client_not_the_service() -> None:
    with pytest.raises(InvalidSpec, match="basehold Client"):
        normalize_device_map("this-gpu", False, cuda_count=2, uuids=UUIDS)
