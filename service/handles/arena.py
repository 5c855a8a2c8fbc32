"""The arena: one immutable file per model that is itself a valid safetensors file.

Written once (streamed tensor by tensor, never rewritten or truncated: a reader of a
truncated shared file dies with SIGBUS), published by rename, then mapped PROT_READ by the
service and by every worker. Tensors are views of that mapping; `torch.frombuffer` keeps
the mapping alive for as long as any view exists, so the mapping is never closed by hand.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from service.handles.descriptor import ArenaEntry

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


def _header(entries: list[ArenaEntry]) -> bytes:
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
    total = -(-(8 + len(raw)) // PAGE) * PAGE
    return raw + b" " * (total - 8 - len(raw))


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


def write_arena(
    directory: Path, stem: str, tensors: dict[str, torch.Tensor]
) -> tuple[Path, list[ArenaEntry], int]:
    """Write and publish an arena; returns (path, entries, data_start)."""
    entries = plan_entries(tensors.items())
    header = _header(entries)
    final = directory / f"{stem}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as out:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            for entry in entries:
                flat = tensors[entry.name].detach().contiguous().reshape(-1)
                if flat.numel():
                    out.write(flat.view(torch.uint8).numpy().data)
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final, entries, 8 + len(header)


def map_readonly(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def view(mapping: mmap.mmap, entry: ArenaEntry, data_start: int) -> torch.Tensor:
    dtype = TORCH_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    with warnings.catch_warnings():
        # Read-only on purpose: a write through these views faults instead of corrupting.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = torch.frombuffer(
            mapping, dtype=torch.uint8, count=entry.nbytes, offset=data_start + entry.offset
        )
    return raw.view(dtype).view(entry.shape)


def views(
    mapping: mmap.mmap, entries: list[ArenaEntry], data_start: int
) -> dict[str, torch.Tensor]:
    return {e.name: view(mapping, e, data_start) for e in entries}
