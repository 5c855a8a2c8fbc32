"""Device segments as CUDA VMM allocations exported as POSIX file descriptors.

The loader allocates each segment with `cuMemCreate` (requesting
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), maps it into its address space, copies the
model's tensors in, and exports an fd with `cuMemExportToShareableHandle`. The fd travels
over Unix sockets like the arena's memfd: to the service, which keeps it, and from there to
leased workers, which import it (`cuMemImportFromShareableHandle`), map it on their own
index of the same GPU (found by UUID) read-only where the driver allows
(CU_MEM_ACCESS_FLAGS_PROT_READ, as NVIDIA's GPU memory service maps its read-only clients)
and wrap it as a tensor through `__cuda_array_interface__`, zero-copy. CUDA frees the
memory once every mapping is unmapped and every handle and fd is released
("cuMemRelease"), so a segment outlives the loader that made it while the service holds
its fd; unlike legacy CUDA IPC it needs no shared
/dev/shm, no exporting process alive, no common torch build, and opens in another PID
namespace. The driver calls go through NVIDIA's cuda-bindings (`pip install
cuda-bindings`), imported only when a GPU segment is made or opened.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

_FD_HANDLE = "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR"
_init_lock = threading.Lock()
_primary: dict[int, Any] = {}  # device index -> its retained primary context


class VmmUnavailable(RuntimeError):
    """No driver, no cuda-bindings, or a driver call failed (the message says which)."""


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise VmmUnavailable(
            "cuda-bindings is not installed: `pip install cuda-bindings` (GPU models are lent "
            "as CUDA VMM file descriptors through it)"
        ) from exc
    return driver


def _check(result: Any, call: str) -> Any:
    """cuda-bindings returns (CUresult, *values): the values, or VmmUnavailable."""
    driver = _driver()
    status, *values = result if isinstance(result, tuple) else (result,)
    if status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        text = name.decode() if isinstance(name, bytes) else str(name)
        raise VmmUnavailable(f"{call} failed: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _primary_context(index: int) -> Any:
    """The device's primary context (the one torch uses), retained once per process: a
    retain per call would only raise its reference count."""
    driver = _driver()
    with _init_lock:
        if index in _primary:
            return _primary[index]
        try:
            result = driver.cuInit(0)
        except Exception as exc:  # no driver library at all (cuda-pathfinder raises)
            raise VmmUnavailable(f"the NVIDIA driver cannot be loaded: {exc}") from exc
        _check(result, "cuInit")
        device = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        context = _check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
        _primary[index] = context
        return context


@contextlib.contextmanager
def _use_device(index: int) -> Iterator[None]:
    """Make the device's primary context current in this thread for the block, then
    restore whatever context the caller had current (a worker's torch may be on another
    device: changing it under its feet would send its next kernels there)."""
    context = _primary_context(index)
    driver = _driver()
    previous = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    _check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    try:
        yield
    finally:
        driver.cuCtxSetCurrent(previous)


def _prop(index: int) -> Any:
    driver = _driver()
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    prop.requestedHandleTypes = getattr(driver.CUmemAllocationHandleType, _FD_HANDLE)
    return prop


def granularity(index: int) -> int:
    driver = _driver()
    flag = driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    return int(_check(driver.cuMemGetAllocationGranularity(_prop(index), flag), "granularity"))


class Mapping:
    """One VMM allocation mapped on one device in this process: read-write for the loader
    that fills it, read-only (CU_MEM_ACCESS_FLAGS_PROT_READ) for a worker where the driver
    accepts it, so a stray write faults in that worker instead of changing the base under
    every other one. `read_only` says what was granted; `read_only_refused` why a
    read-only request fell back to read-write. Dropping the last tensor over it unmaps it
    and releases this process's handle."""

    def __init__(self, handle: int, index: int, size: int, read_only: bool = False) -> None:
        driver = _driver()
        self.handle, self.index, self.size = handle, index, size
        self.address = 0
        self.read_only = False
        self.read_only_refused: str | None = None
        try:
            address = _check(
                driver.cuMemAddressReserve(size, granularity(index), 0, 0), "cuMemAddressReserve"
            )
            self.address = int(address)
            _check(driver.cuMemMap(self.address, size, 0, handle, 0), "cuMemMap")
            flags = driver.CUmemAccess_flags
            if read_only:
                try:
                    self._set_access(flags.CU_MEM_ACCESS_FLAGS_PROT_READ)
                    self.read_only = True
                except VmmUnavailable as exc:
                    self.read_only_refused = str(exc)
            if not self.read_only:
                self._set_access(flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        except BaseException:
            self.close()
            raise
        # What torch.as_tensor reads (a 1-D uint8 array of the whole mapping). Its read-only
        # flag stays False even for a PROT_READ mapping: torch refuses read-only arrays; the
        # worker's copy-on-write parameters keep writes away from it instead.
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (self.address, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }

    def _set_access(self, flags: Any) -> None:
        driver = _driver()
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.index
        access.flags = flags
        _check(driver.cuMemSetAccess(self.address, self.size, [access], 1), "cuMemSetAccess")

    def export(self) -> int:
        """A new POSIX fd of the allocation (the caller owns it)."""
        driver = _driver()
        kind = getattr(driver.CUmemAllocationHandleType, _FD_HANDLE)
        return int(_check(driver.cuMemExportToShareableHandle(self.handle, kind, 0), "export"))

    def close(self) -> None:
        """Unmap and release. Kernels still queued on the device may read the mapping:
        the context is synchronized first (unmapping under them is an illegal address)."""
        driver = _driver()
        if self.address:
            with _use_device(self.index):
                driver.cuCtxSynchronize()
                driver.cuMemUnmap(self.address, self.size)
                driver.cuMemAddressFree(self.address, self.size)
            self.address = 0
        if self.handle:
            driver.cuMemRelease(self.handle)
            self.handle = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at exit the driver reclaims it anyway
            self.close()

    def tensor(self) -> torch.Tensor:
        """The mapping as a flat uint8 CUDA tensor; torch keeps this object (and so the
        mapping) alive as long as the tensor's storage lives."""
        return torch.as_tensor(self, device=torch.device("cuda", self.index))


def create(index: int, nbytes: int) -> Mapping:
    """A new exportable allocation of at least `nbytes` on CUDA device `index`, mapped
    read-write (the loader copies the model in)."""
    with _use_device(index):
        driver = _driver()
        step = granularity(index)
        size = max(step, -(-nbytes // step) * step)
        handle = _check(driver.cuMemCreate(size, _prop(index), 0), "cuMemCreate")
        return Mapping(int(handle), index, size)


def import_fd(fd: int, index: int, size: int, read_only: bool = True) -> Mapping:
    """Map the allocation behind `fd` on device `index` (the caller keeps `fd`); with
    `read_only`, PROT_READ where the driver grants it (`Mapping.read_only` says)."""
    with _use_device(index):
        driver = _driver()
        kind = getattr(driver.CUmemAllocationHandleType, _FD_HANDLE)
        handle = _check(driver.cuMemImportFromShareableHandle(fd, kind), "import")
        return Mapping(int(handle), index, size, read_only=read_only)
