"""The arena: one sealed memfd per model whose bytes are a valid safetensors file.

Written once (streamed tensor by tensor), then sealed with F_SEAL_WRITE, F_SEAL_SHRINK,
F_SEAL_GROW and F_SEAL_SEAL: from then on the kernel refuses every write, truncation and
writable shared mapping to anyone, the service included, also through /proc/<pid>/fd. It
lives in no filesystem: nothing can swap it, and it is freed when the last fd or mapping
goes, however its holders die. The service maps it PROT_READ/MAP_SHARED; a worker maps it
MAP_PRIVATE with write access, so reads share the service's pages and a write (an
in-place op, `merge_and_unload()`) copies only the page written into the worker.
Tensors are views of a mapping; `torch.frombuffer` keeps the mapping alive for as long as
any view exists, so mappings are never closed by hand.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from service.common.handles.descriptor import ArenaEntry
from service.common.handles.memfd import is_sealed, new_memfd, seal

PAGE = mmap.PAGESIZE
# safetensors dtype codes.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class Arena:
    """A written, sealed arena: the service's fd and where the tensors are."""

    fd: int
    name: str
    size: int
    data_start: int
    entries: list[ArenaEntry]


def header(entries: list[ArenaEntry], data_start: int | None = None) -> bytes:
    """The safetensors header (its 8-byte length first) of `entries`, padded so that tensor
    data starts at `data_start` (default: the next page boundary). ValueError when it
    does not fit there."""
    body: dict[str, object] = {
        e.name: {
            "dtype": e.dtype,
            "shape": e.shape,
            "data_offsets": [e.offset, e.offset + e.nbytes],
        }
        for e in entries
    }
    body["__metadata__"] = {"format": "pt", "producer": "basehold"}
    raw = json.dumps(body, separators=(",", ":")).encode()
    # Pad with spaces (allowed by the format) so tensor data starts on a page boundary.
    total = -(-(8 + len(raw)) // PAGE) * PAGE if data_start is None else data_start
    if 8 + len(raw) > total:
        raise ValueError(f"a header of {8 + len(raw)} bytes does not fit before {total}")
    padded = raw + b" " * (total - 8 - len(raw))
    return len(padded).to_bytes(8, "little") + padded


def plan_entries(
    tensors: Iterable[tuple[str, torch.Tensor]], *, align: int = 1, segment: str | None = None
) -> list[ArenaEntry]:
    """Lay tensors out largest element first, so every tensor is naturally aligned.

    The file keeps them contiguous (safetensors allows no holes); device segments ask for
    a coarser `align` so kernels get the alignment a fresh allocation would have."""
    items = sorted(tensors, key=lambda kv: (-kv[1].element_size(), kv[0]))
    entries, offset = [], 0
    for name, tensor in items:
        offset = -(-offset // align) * align
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            ArenaEntry(
                name=name,
                dtype=DTYPE_CODES[tensor.dtype],
                shape=list(tensor.shape),
                offset=offset,
                nbytes=nbytes,
                segment=segment,
            )
        )
        offset += nbytes
    return entries


def segment_view(base: torch.Tensor, entry: ArenaEntry) -> torch.Tensor:
    """A typed view of one entry inside a flat uint8 device segment."""
    raw = base[entry.offset : entry.offset + entry.nbytes]
    return raw.view(TORCH_DTYPES[entry.dtype]).view(entry.shape)


def write_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_arena(name: str, tensors: dict[str, torch.Tensor]) -> Arena:
    """Write the tensors into a new memfd and seal it. The caller owns the returned fd."""
    return stream_arena(name, dict(tensors), lambda entry, view: None)[0]


def stream_arena(
    name: str, tensors: dict[str, torch.Tensor], placed: Callable[[str, torch.Tensor], None]
) -> tuple[Arena, mmap.mmap]:
    """Write the tensors into a new memfd, seal it, and return it with the service's
    mapping of it (read-only). Each tensor is taken out of `tensors` as it is written and
    `placed(name, view)` is called with its view of the arena: a caller that re-points its
    model there (and holds no other reference) frees the source at once, so writing takes
    the arena plus one tensor, not two copies of the model. The caller owns the fd."""
    entries = plan_entries(tensors.items())
    head = header(entries)
    data_start = len(head)
    size = data_start + max((e.offset + e.nbytes for e in entries), default=0)
    fd = new_memfd(name)
    try:
        os.ftruncate(fd, size)
        write_all(fd, head, 0)
        mapping = map_own(fd)
        with read_only_ok():
            for entry in entries:
                flat = tensors.pop(entry.name).detach().contiguous().reshape(-1)
                if flat.numel():
                    write_all(fd, flat.view(torch.uint8).numpy().data, data_start + entry.offset)
                del flat
                placed(entry.name, _view(mapping, entry, data_start))
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    arena = Arena(fd=fd, name=f"basehold:{name}", size=size, data_start=data_start, entries=entries)
    return arena, mapping


def map_own(fd: int) -> mmap.mmap:
    """The writer's read-only mapping of an arena it has not sealed yet: made through a
    read-only fd, since a shared mapping of the writable memfd (even PROT_READ) could be
    made writable, and the kernel refuses F_SEAL_WRITE while one exists."""
    read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return map_shared(read_only)
    finally:
        os.close(read_only)


def map_shared(fd: int) -> mmap.mmap:
    """The service's mapping: read-only, the arena's own pages."""
    return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)


def map_copy_on_write(fd: int) -> mmap.mmap:
    """A worker's mapping: reads share the arena's pages; a write copies that page into
    this process only (the seal keeps the arena itself unchanged)."""
    if not is_sealed(fd):
        raise ValueError("refusing an arena that is not sealed: its bytes could still change")
    return mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)


@contextmanager
def read_only_ok() -> Iterator[None]:
    with warnings.catch_warnings():
        # The service's mapping is read-only on purpose: a write through it faults.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        yield


def _view(mapping: mmap.mmap, entry: ArenaEntry, data_start: int) -> torch.Tensor:
    """One tensor, its own `frombuffer` (one storage per tensor: tensors sharing a storage
    would look tied to `save_pretrained`)."""
    dtype = TORCH_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.frombuffer(
        mapping, dtype=torch.uint8, count=entry.nbytes, offset=data_start + entry.offset
    )
    return raw.view(dtype).view(entry.shape)


def view(mapping: mmap.mmap, entry: ArenaEntry, data_start: int) -> torch.Tensor:
    with read_only_ok():
        return _view(mapping, entry, data_start)


def views(
    mapping: mmap.mmap, entries: list[ArenaEntry], data_start: int
) -> dict[str, torch.Tensor]:
    with read_only_ok():  # once per model, not per tensor (~2 µs each)
        return {e.name: _view(mapping, e, data_start) for e in entries}
