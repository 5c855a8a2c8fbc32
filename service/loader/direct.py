"""Direct placement: a CPU load whose weights transformers keeps as they are in the files
(no cast, no quantization, no new head) gets its arena filled by the kernel while
transformers builds the model.

Once the load is admitted, a thread copies each safetensors file's tensor data into the
arena's memfd with `sendfile` (the GIL released, no page of it faulted in this process),
one file after another, where the arena's data will start. Meanwhile transformers builds
the model; the tensors it hands out unconverted are views of its mapping of those files.
`adopt` then finds each tensor's bytes in the arena through the mapping it is a view of
(`/proc/self/maps`: which file, which offset), appends what has no bytes in the files
(computed buffers), writes the header and re-points the model to the arena.

Whatever does not fit (a checkpoint tensor the model does not hold as it is in the file,
a misaligned one, a header larger than the room left for it, a file that changed) sends
the load down the usual path (`stream_arena`) with the copy dropped first, so an arena
never holds bytes no tensor uses and a load never holds two copies.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.common.cuda import CudaProbe
from service.common.handles.arena import (
    DTYPE_CODES,
    PAGE,
    TORCH_DTYPES,
    Arena,
    header,
    map_own,
    plan_entries,
    views,
    write_all,
)
from service.common.handles.descriptor import ArenaEntry
from service.common.handles.memfd import new_memfd, seal
from service.common.load.spec import DType, LoadRequest, Task
from service.loader.checkpoint import read_safetensors_header
from service.loader.resident import FileMapping, file_mappings, written_bytes
from service.loader.tasks import auto_class

log = logging.getLogger("basehold.loading")

_CHUNK = 64 * 1024 * 1024  # bytes per sendfile call: a cancelled copy stops within one
PADDING = "__basehold_padding__"  # aligns what is appended after the files' data
_UNKNOWN = "?"  # a config dtype of no safetensors code: no file has it
Placed = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class _Section:
    """One file's tensor data, copied verbatim into the arena at `base`."""

    path: Path
    identity: tuple[int, int, int]  # inode, size, mtime: the file must not change meanwhile
    data_begin: int  # where its tensor data starts in the file
    size: int
    base: int  # where it starts in the arena's data
    tensors: dict[int, tuple[int, str]]  # begin -> (end, dtype code)


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def sections(files: Sequence[Path]) -> list[_Section]:
    sections, base = [], 0
    for path in files:
        entries = read_safetensors_header(path)
        raw = {name: entry for name, entry in entries.items() if name != "__metadata__"}
        size = max((int(e["data_offsets"][1]) for e in raw.values()), default=0)  # type: ignore[index]
        identity = _identity(path)
        begin = identity[1] - size
        tensors = {  # by where they begin; empty ones take no bytes and need no place
            int(e["data_offsets"][0]): (int(e["data_offsets"][1]), str(e["dtype"]))  # type: ignore[index]
            for e in raw.values()
            if int(e["data_offsets"][1]) > int(e["data_offsets"][0])  # type: ignore[index]
        }
        sections.append(_Section(path, identity, begin, size, base, tensors))
        base += size
    return sections


def data_start_for(sections: Sequence[_Section]) -> int:
    """Where an arena of these files' tensors puts its data: room for a header twice the
    size of theirs (names, shapes; a renamed key may be longer), page-aligned."""
    header_room = sum(s.data_begin for s in sections)
    return -(-(2 * header_room + 4 * PAGE) // PAGE) * PAGE


def _target_dtype(spec: LoadRequest, config: Any) -> str | None:
    """The safetensors code every floating tensor must already have; None: any one code."""
    if spec.dtype != DType.AUTO:
        return DTYPE_CODES[getattr(torch, spec.dtype.value)]
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    return DTYPE_CODES.get(dtype, _UNKNOWN) if dtype is not None else None


def host_plain(spec: LoadRequest, config: Any, files: Sequence[Path], cuda: CudaProbe) -> bool:
    """Whether transformers loads this on the host, from safetensors files, making no
    tensors of its own (no quantization, offload, new head, remote code, fused checkpoint
    tensors): the files' tensors go into the arena as they are (`Prefetch`) or cast
    (`service.loader.cast_arena`)."""
    if spec.quantization is not None or spec.offload or spec.max_memory is not None:
        return False
    if spec.num_labels is not None or getattr(config, "auto_map", None):
        return False  # a new head; remote code is never shared
    if getattr(config, "quantization_config", None) is not None:
        return False  # quantized in the files: transformers builds its own tensors
    if not files or any(path.suffix != ".safetensors" for path in files):
        return False
    if _converted(config, files):
        return False  # new tensors: the copy would only add a second model
    device_map = spec.device_map
    if not isinstance(device_map, str) or device_map.startswith("cuda"):
        return False
    return device_map == "cpu" or cuda.device_count() == 0  # asked last: it may start CUDA


def applies(
    spec: LoadRequest, config: Any, task: Task, files: Sequence[Path], cuda: CudaProbe
) -> bool:
    """Whether transformers will keep this load's weights as the files have them, on the
    host: then `Prefetch` is worth starting (`adopt` checks what really happened)."""
    return not _kept_in_float32(config, task, spec) and host_plain(spec, config, files, cuda)


def _kept_in_float32(config: Any, task: Task, spec: LoadRequest) -> bool:
    """Whether a 16-bit load of this architecture keeps some modules in float32 (T5's, for
    one): transformers casts those tensors, and the rest of the file is cast or not."""
    if _target_dtype(spec, config) in ("F32", "F64"):
        return False
    try:
        model_class = auto_class(task)._model_mapping[type(config)]
    except (KeyError, AttributeError, ValueError):
        return True  # not known here: assume it converts
    return bool(
        getattr(model_class, "_keep_in_fp32_modules", None)
        or getattr(model_class, "_keep_in_fp32_modules_strict", None)
    )


def _converted(config: Any, files: Sequence[Path]) -> bool:
    """Whether transformers may build new tensors from these checkpoint files' tensors: a
    `WeightConverter` in the model's conversion table (Mixtral's experts fused, Dinov2's
    SwiGLU split, for two) that takes some tensor of the files. transformers looks its
    tables up by each sub-model's class name, then its model type; before the model is
    built, those are the config's and its sub-configs' model types, the architectures it
    names and the base model classes. (A conversion missed here costs the copy made
    ahead, never a wrong arena: `adopt` takes only the files' bytes as they are.)"""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # an older transformers converts nothing at load
        return False
    converters = [
        rule
        for name in _conversion_names(config)
        for rule in get_checkpoint_conversion_mapping(name) or []
        if isinstance(rule, WeightConverter)
    ]
    if not converters:
        return False
    keys = [key for path in files for key in read_safetensors_header(path) if key != "__metadata__"]
    return any(_takes_any(rule, keys) for rule in converters)


def _takes_any(converter: Any, keys: list[str]) -> bool:
    """Whether `converter` matches any of the checkpoint's `keys` (True where it cannot
    tell: a transformers whose converters have no compiled source patterns)."""
    sources = getattr(converter, "compiled_sources", None)
    if not isinstance(sources, re.Pattern):
        return True
    return any(sources.search(key) for key in keys)


def _conversion_names(config: Any) -> set[str]:
    """What transformers may look a conversion table up by, for `config`'s model."""
    from transformers import AutoModel

    architectures = getattr(config, "architectures", None) or []
    names: set[str] = {architectures} if isinstance(architectures, str) else set(architectures)
    configs = [config]
    configs += [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
    for each in configs:
        if each is None:
            continue
        names.add(getattr(each, "model_type", "") or "")
        with suppress(KeyError, ValueError, AttributeError):
            found: Any = AutoModel._model_mapping[type(each)]
            for model_class in found if isinstance(found, tuple) else (found,):
                names.add(getattr(model_class, "__name__", ""))
    names.discard("")
    return names


@dataclass
class Prefetch:
    """The arena's memfd while the files' tensor data is copied into it (a thread)."""

    name: str
    sections: list[_Section]
    data_start: int
    fd: int | None
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def start(
        cls, name: str, spec: LoadRequest, config: Any, files: Sequence[Path]
    ) -> Prefetch | None:
        """Start the copy, or None when the files' dtypes say transformers will convert."""
        parts = sections(files)
        codes = {code for s in parts for _, code in s.tensors.values()}
        floating = codes & {"F64", "F32", "F16", "BF16"}
        wanted = _target_dtype(spec, config)
        if len(floating) > 1 or (wanted is not None and floating - {wanted}):
            return None
        if codes - set(DTYPE_CODES.values()):
            return None  # a dtype the arena cannot describe: the model is held privately
        data_start = data_start_for(parts)
        prefetch = cls(name, parts, data_start, new_memfd(name))
        try:
            assert prefetch.fd is not None
            os.ftruncate(prefetch.fd, data_start + sum(s.size for s in parts))
            thread = threading.Thread(target=prefetch._copy, name="arena-copy", daemon=True)
            thread.start()
            prefetch._thread = thread
        except BaseException:
            prefetch.close()
            raise
        return prefetch

    def loading(self) -> AbstractContextManager[None]:
        """What the load runs within: nothing (the copy runs beside it, on its own)."""
        return nullcontext()

    def _copy(self) -> None:
        assert self.fd is not None
        try:
            os.lseek(self.fd, self.data_start, os.SEEK_SET)
            for section in self.sections:
                with section.path.open("rb") as source:
                    offset, end = section.data_begin, section.data_begin + section.size
                    while offset < end and not self._stop.is_set():
                        sent = os.sendfile(
                            self.fd, source.fileno(), offset, min(_CHUNK, end - offset)
                        )
                        if sent == 0:
                            raise EOFError(f"{section.path.name} ended at byte {offset}")
                        offset += sent
        except BaseException as exc:
            self._error = exc

    def _copied(self) -> bool:
        """Wait for the copy; False (logged) when it failed."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            log.warning(
                "copying the checkpoint into the arena failed (%s); writing it from the model",
                self._error,
            )
            return False
        return True

    def close(self) -> None:
        """Stop the copy and free the memfd, unless `adopt` made it the arena."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def adopt(
        self, tensors: dict[str, torch.Tensor], placed: Placed
    ) -> tuple[Arena, mmap.mmap] | None:
        """The arena with every tensor of `tensors` (host tensors by arena entry, deduplicated)
        in it and `placed(name, view)` called for each, as `stream_arena` does; None (nothing
        changed) when the model does not hold the files' tensors as they are."""
        layout = self._layout(tensors)
        if layout is None:
            return None
        entries, extras = layout
        if not self._copied():
            return None
        if any(_identity(s.path) != s.identity for s in self.sections):
            log.warning("a checkpoint file changed while it was copied; loading it again")
            return None
        assert self.fd is not None
        fd, data_start = self.fd, self.data_start
        written = write_rest(fd, data_start, entries, extras, tensors, placed)
        if written is None:
            return None
        size, mapping = written
        seal(fd)
        self.fd = None  # the arena's now
        log.debug(
            "%s: placed directly (the files' bytes, copied while transformers loaded)", self.name
        )
        arena = Arena(fd, f"basehold:{self.name}", size, data_start, entries)
        return arena, mapping

    def _layout(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[list[ArenaEntry], list[ArenaEntry]] | None:
        """Each tensor's place: in a file's copied data where it is a view of it, else
        appended (`extras`); None when some checkpoint tensor is not one of them."""
        paths = [s.path for s in self.sections]
        if written_bytes(paths):
            return None  # a tensor was changed in place: it no longer holds the file's bytes
        mappings = file_mappings(paths)
        by_path = {str(s.path.resolve()): s for s in self.sections}
        entries: list[ArenaEntry] = []
        rest: list[tuple[str, torch.Tensor]] = []
        used: set[tuple[int, int]] = set()  # (section's base, begin)
        for name, tensor in tensors.items():
            found = _in_files(tensor, mappings, by_path)
            if found is None:
                rest.append((name, tensor))
                continue
            section, begin = found
            end, code = section.tensors[begin]
            nbytes = tensor.numel() * tensor.element_size()
            offset = section.base + begin
            if (
                end - begin != nbytes
                or code != DTYPE_CODES.get(tensor.dtype)
                or (section.base, begin) in used
                or offset % tensor.element_size()
            ):
                return None
            used.add((section.base, begin))
            entries.append(
                ArenaEntry(
                    name=name, dtype=code, shape=list(tensor.shape), offset=offset, nbytes=nbytes
                )
            )
        if len(used) != sum(len(s.tensors) for s in self.sections):
            return None  # bytes no tensor would use: the usual path writes only what is held
        extras = appended(rest, sum(s.size for s in self.sections))
        return [*entries, *extras], [e for e in extras if e.name != PADDING]


def write_rest(
    fd: int,
    data_start: int,
    entries: list[ArenaEntry],
    extras: list[ArenaEntry],
    tensors: dict[str, torch.Tensor],
    placed: Placed,
) -> tuple[int, mmap.mmap] | None:
    """Finish an arena whose data is in `fd` but for `extras`: the header, the extras, a
    read-only mapping, and each tensor of `tensors` re-pointed there (`placed`) and taken
    out. Returns its size and the mapping (`entries` sorted by offset); None (nothing
    written) when the header does not fit before `data_start`. The caller seals it."""
    entries.sort(key=lambda e: e.offset)
    try:
        head = header(entries, data_start)
    except ValueError:
        return None
    size = data_start + max((e.offset + e.nbytes for e in entries), default=0)
    os.ftruncate(fd, size)
    write_all(fd, head, 0)
    for entry in extras:
        flat = tensors[entry.name].detach().contiguous().reshape(-1)
        if flat.numel():
            write_all(fd, flat.view(torch.uint8).numpy().data, data_start + entry.offset)
        del flat
    mapping = map_own(fd)
    held = [e for e in entries if not e.name.startswith(PADDING)]
    for name, view in views(mapping, held, data_start).items():
        del tensors[name]
        placed(name, view)
    return size, mapping


def _in_files(
    tensor: torch.Tensor, mappings: list[FileMapping], by_path: dict[str, _Section]
) -> tuple[_Section, int] | None:
    """The file section and data offset `tensor`'s bytes are in, if it is a contiguous view
    of a mapped file at the start of one of its tensors."""
    if not tensor.is_contiguous() or tensor.dtype not in DTYPE_CODES or not tensor.numel():
        return None
    pointer = tensor.data_ptr()
    for mapping in mappings:
        if pointer in mapping.addresses:
            section = by_path[mapping.path]
            begin = mapping.file_offset + pointer - mapping.addresses.start - section.data_begin
            return (section, begin) if begin in section.tensors else None
    return None


def appended(rest: list[tuple[str, torch.Tensor]], start: int) -> list[ArenaEntry]:
    """Entries for tensors with no bytes in the files, after them (largest element first,
    a padding entry where the first one would be misaligned: safetensors allows no holes)."""
    planned = plan_entries(rest)
    if not planned:
        return []
    align = max(TORCH_DTYPES[e.dtype].itemsize for e in planned)
    pad = -start % align
    padding = (
        [ArenaEntry(name=PADDING, dtype="U8", shape=[pad], offset=start, nbytes=pad)] if pad else []
    )
    shifted = [
        ArenaEntry(
            name=e.name,
            dtype=e.dtype,
            shape=e.shape,
            offset=start + pad + e.offset,
            nbytes=e.nbytes,
        )
        for e in planned
    ]
    return [*padding, *shifted]
