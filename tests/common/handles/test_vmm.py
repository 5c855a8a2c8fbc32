"""The CUDA VMM calls' order and flags, without a GPU: `vmm._driver` is the seam. The fake
keeps cuda-bindings' own types and enums (they import without a driver) and records the
calls a worker's import and unmap make; what the memory does is left to
bench/gpu_check.py on a GPU."""

from __future__ import annotations

from typing import Any

import pytest

real = pytest.importorskip("cuda.bindings.driver")

from service.common.handles import vmm  # noqa: E402

GRANULARITY = 2 << 20
SUCCESS = real.CUresult.CUDA_SUCCESS
READ = real.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
READWRITE = real.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class FakeDriver:
    """cuda-bindings' driver module with the calls recorded; the caller's thread starts
    with its own context current (as a worker's torch has)."""

    def __init__(self, refuse_read_only: bool = False) -> None:
        self.calls: list[str] = []
        self.access: list[Any] = []
        self.current = "callers-context"
        self.refuse_read_only = refuse_read_only

    def __getattr__(self, name: str) -> Any:
        return getattr(real, name)  # types, enums, CUresult

    def _did(self, call: str, *values: Any) -> tuple[Any, ...]:
        self.calls.append(call)
        return (SUCCESS, *values)

    def cuInit(self, flags: int) -> tuple[Any, ...]:
        return self._did("cuInit")

    def cuDeviceGet(self, index: int) -> tuple[Any, ...]:
        return self._did("cuDeviceGet", f"device-{index}")

    def cuDevicePrimaryCtxRetain(self, device: str) -> tuple[Any, ...]:
        return self._did("cuDevicePrimaryCtxRetain", f"primary-of-{device}")

    def cuCtxGetCurrent(self) -> tuple[Any, ...]:
        return self._did("cuCtxGetCurrent", self.current)

    def cuCtxSetCurrent(self, context: str) -> tuple[Any, ...]:
        self.current = context
        return self._did(f"cuCtxSetCurrent {context}")

    def cuCtxSynchronize(self) -> tuple[Any, ...]:
        return self._did(f"cuCtxSynchronize in {self.current}")

    def cuMemGetAllocationGranularity(self, prop: Any, flag: Any) -> tuple[Any, ...]:
        return (SUCCESS, GRANULARITY)

    def cuMemImportFromShareableHandle(self, fd: int, kind: Any) -> tuple[Any, ...]:
        return self._did("import", 77)

    def cuMemCreate(self, size: int, prop: Any, flags: int) -> tuple[Any, ...]:
        return self._did("create", 78)

    def cuMemAddressReserve(self, size: int, align: int, addr: int, flags: int) -> tuple[Any, ...]:
        return self._did("reserve", 0x7000_0000)

    def cuMemMap(self, address: int, size: int, offset: int, handle: int, flags: int) -> Any:
        return self._did("map")

    def cuMemSetAccess(self, address: int, size: int, access: list[Any], count: int) -> Any:
        self.access.append(access[0].flags)
        if access[0].flags == READ and self.refuse_read_only:
            self.calls.append("access refused")
            return (real.CUresult.CUDA_ERROR_NOT_SUPPORTED,)
        return self._did("access")

    def cuMemUnmap(self, address: int, size: int) -> tuple[Any, ...]:
        return self._did(f"unmap in {self.current}")

    def cuMemAddressFree(self, address: int, size: int) -> tuple[Any, ...]:
        return self._did("free")

    def cuMemRelease(self, handle: int) -> tuple[Any, ...]:
        return self._did("release")

    def cuGetErrorName(self, status: Any) -> tuple[Any, ...]:
        return (SUCCESS, status.name.encode())


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver()
    monkeypatch.setattr(vmm, "_driver", lambda: fake)
    monkeypatch.setattr(vmm, "_primary", {})
    return fake


def test_a_worker_maps_read_only(driver: FakeDriver) -> None:
    mapping = vmm.import_fd(5, 0, GRANULARITY, read_only=True)
    assert mapping.read_only and mapping.read_only_refused is None
    assert driver.access == [READ]
    mapping.close()


def test_a_refused_read_only_mapping_falls_back_to_read_write_and_says_why(
    driver: FakeDriver,
) -> None:
    driver.refuse_read_only = True
    mapping = vmm.import_fd(5, 0, GRANULARITY, read_only=True)
    assert not mapping.read_only
    assert mapping.read_only_refused == "cuMemSetAccess failed: CUDA_ERROR_NOT_SUPPORTED"
    assert driver.access == [READ, READWRITE]
    mapping.close()


def test_the_loader_maps_its_own_segment_read_write(driver: FakeDriver) -> None:
    mapping = vmm.create(0, 1000)
    assert not mapping.read_only and driver.access == [READWRITE]
    assert mapping.size == GRANULARITY
    mapping.close()


def test_the_callers_context_is_restored(driver: FakeDriver) -> None:
    mapping = vmm.import_fd(5, 1, GRANULARITY)
    assert driver.current == "callers-context"
    assert "cuCtxSetCurrent primary-of-device-1" in driver.calls
    vmm.import_fd(6, 1, GRANULARITY).close()
    assert driver.calls.count("cuDevicePrimaryCtxRetain") == 1  # retained once per device
    mapping.close()
    assert driver.current == "callers-context"


def test_close_synchronizes_the_device_before_unmapping(driver: FakeDriver) -> None:
    mapping = vmm.import_fd(5, 0, GRANULARITY)
    driver.calls.clear()
    mapping.close()
    assert driver.calls == [
        "cuCtxGetCurrent",
        "cuCtxSetCurrent primary-of-device-0",
        "cuCtxSynchronize in primary-of-device-0",
        "unmap in primary-of-device-0",
        "free",
        "cuCtxSetCurrent callers-context",
        "release",
    ]
    mapping.close()  # a second close does nothing
    assert driver.calls[-1] == "release" and len(driver.calls) == 7
