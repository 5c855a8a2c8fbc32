"""The serving process counts GPUs from NVML under CUDA_VISIBLE_DEVICES, as CUDA does."""

from __future__ import annotations

import pytest

from service.serving.memory.nvml import GpuMemory
from service.serving.memory.visible import NvmlCuda, visible

GPUS = [
    GpuMemory(index=i, name="H200", total_bytes=100, free_bytes=90 - i, used_bytes=10 + i, uuid=u)
    for i, u in enumerate(["GPU-aaa111", "GPU-bbb222", "GPU-abc333"])
]


class Probe:
    def gpus(self) -> list[GpuMemory]:
        return list(reversed(GPUS))  # NVML's order is by index, whatever the list says


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, [0, 1, 2]),
        ("", []),
        ("2,0", [2, 0]),
        ("1,7,0", [1]),  # CUDA stops at the first entry that names no device
        ("GPU-bbb,0", [1, 0]),
        ("GPU-a", []),  # ambiguous prefix: no device
        ("GPU-abc", [2]),
        ("0,0", [0]),
        ("-1,0", []),
    ],
)
def test_cuda_visible_devices(setting: str | None, expected: list[int]) -> None:
    assert [g.index for g in visible(GPUS, setting)] == expected


def test_the_probe_reports_what_nvml_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1")
    cuda = NvmlCuda(Probe())
    assert cuda.device_count() == 2
    assert cuda.uuids() == ["GPU-abc333", "GPU-bbb222"]
    first = cuda.memory(0)
    assert (first.index, first.free_bytes, first.allocated_bytes, first.uuid) == (
        0,
        88,
        0,
        "GPU-abc333",
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda.device_count() == 3
