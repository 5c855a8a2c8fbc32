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
