"""Make held weights resident and independent of the checkpoint files.

transformers maps safetensors files and, where no conversion is needed, hands out tensors
that are views of that mapping: not resident until touched, and a SIGBUS waiting to happen
if someone rewrites the checkpoint. A holding service copies those tensors (only those)
into private memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from torch import nn

from service.common.handles.arena import PAGE


@dataclass(frozen=True)
class FileMapping:
    """One mapping of a file in this process: its addresses and where in the file they start."""

    addresses: range
    file_offset: int
    path: str


def _resolved(files: Iterable[Path]) -> set[str]:
    return {str(Path(f).resolve()) for f in files}


def _mapped_file(parts: list[str]) -> str | None:
    """The file a maps line (split in at most six) names, if any."""
    return parts[5].removesuffix(" (deleted)") if len(parts) == 6 else None


def file_mappings(files: Iterable[Path], maps: Path = Path("/proc/self/maps")) -> list[FileMapping]:
    wanted = _resolved(files)
    if not wanted or not maps.exists():
        return []
    found = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if (path := _mapped_file(parts)) in wanted:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append(FileMapping(range(start, end), int(parts[2], 16), str(path)))
    return found


def written_bytes(files: Iterable[Path], smaps: Path = Path("/proc/self/smaps")) -> int:
    """Bytes of this process's private mappings of `files` that were written to (copied
    from the file into anonymous pages): there a tensor no longer holds the file's bytes."""
    wanted = _resolved(files)
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's first line
            inside = _mapped_file(parts) in wanted
        elif inside and parts[:1] == ["Anonymous:"]:
            total += int(parts[1]) * 1024
    return total


_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/PID/pagemap's flags


def anonymous_bytes(addresses: range, pagemap: Path = Path("/proc/self/pagemap")) -> int:
    """Bytes of this process's private mapping at `addresses` that were written to (its
    pages copied into anonymous ones, in memory or swapped), from the page table of that
    range alone (`/proc/self/smaps` walks every mapping's: ~30 ms in a loader)."""
    if not addresses:
        return 0
    first, last = addresses.start // PAGE, -(-addresses.stop // PAGE)
    with pagemap.open("rb", buffering=0) as table:
        table.seek(first * 8)
        entries = numpy.frombuffer(table.read((last - first) * 8), dtype="<u8")
    anonymous = (entries & numpy.uint64(_PRESENT | _SWAPPED) != 0) & (
        entries & numpy.uint64(_FILE) == 0
    )
    return int(anonymous.sum()) * PAGE


def file_ranges(files: Iterable[Path], maps: Path = Path("/proc/self/maps")) -> list[range]:
    return [mapping.addresses for mapping in file_mappings(files, maps)]


def _inside(ptr: int, ranges: list[range]) -> bool:
    return any(ptr in r for r in ranges)


@torch.no_grad()
def copy_out_of_files(model: nn.Module, files: Iterable[Path]) -> int:
    """Clone every CPU tensor that still points into `files`; returns bytes copied."""
    ranges = file_ranges(files)
    if not ranges:
        return 0
    copied = 0
    seen: set[int] = set()
    tensors = [*model.parameters(), *model.buffers()]
    for tensor in tensors:
        if id(tensor) in seen or tensor.device.type != "cpu":
            continue
        seen.add(id(tensor))
        if _inside(tensor.untyped_storage().data_ptr(), ranges):
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied
