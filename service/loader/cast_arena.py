"""Cast into the arena: a CPU load whose weights transformers casts (a float32 checkpoint
loaded in bfloat16, say) gets each cast written straight into its place in the arena's
memfd, instead of into private memory first and copied into the arena after (one pass over
the model's bytes instead of two, and no second copy of the model at any time).

While the load runs (`loading`), three of transformers' loading steps are wrapped, in this
loader process only: the step that reads each checkpoint tensor and casts it
(`_materialize_copy`) reads it and leaves the cast for later, marking the dtype it is to
get; a converter's gathering of its inputs (`WeightConverter.materialize_tensors`) casts
them at once, as its ops make new tensors; the step that sets a tensor in the model
(`set_param_for_module`) casts a marked one into the next place of the arena, or, where
no room is left, as transformers would have. transformers still builds the model, renames
keys, ties weights and picks every tensor's dtype.

A cast goes into the arena through a small buffer, 8 MiB at a time, each written into the
memfd with `pwrite`; the model gets a view of a copy-on-write mapping of it. No writable
shared mapping of the arena exists at any time: its pages are neither zeroed ahead, nor
mapped twice, nor unmapped before the seal (writing through a populated shared mapping
instead took ~35% longer here, ~50 ms of it the unmapping of 0.5 GB before the seal).

`adopt` then appends what the arena does not hold yet (computed buffers, tensors cast as
usual), writes the header, re-points the model to a read-only mapping and seals, as
`direct.Prefetch.adopt` does. Where that does not fit (a cast the model no longer holds, a
header larger than its room, a cast written to in place: its copy-on-write pages), it
returns None and the usual path (`stream_arena`) writes the arena from the model.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from service.common.handles.arena import (
    DTYPE_CODES,
    Arena,
    write_all,
)
from service.common.handles.descriptor import ArenaEntry
from service.common.handles.memfd import new_memfd, seal
from service.loader.direct import (
    PADDING,
    Placed,
    appended,
    data_start_for,
    sections,
    write_rest,
)
from service.loader.resident import anonymous_bytes

log = logging.getLogger("basehold.loading")

_CAST_TO = "_basehold_cast_to"  # set on a tensor read but not cast yet: the dtype it gets
_STAGING = 8 * 2**20  # bytes cast at a time on the way into the arena


class CastArena:
    """The arena's memfd, written by the casts themselves in the order they come: each cast
    takes the next place (aligned to its element, a padding entry over any gap) in a
    range reserved at the first one for the model built on the meta device."""

    def __init__(self, name: str, data_start: int) -> None:
        self.name = name
        self.data_start = data_start
        self.fd: int | None = None
        self._mapping: mmap.mmap | None = None  # copy-on-write: the model's views of casts
        self._addresses = range(0)  # where that mapping is
        self._staging: torch.Tensor | None = None  # bytes: each cast passes through it
        self._reserved: int | None = None  # None: nothing cast yet; 0: no room to cast into
        self._slots: dict[str, tuple[ArenaEntry, torch.Tensor]] = {}
        self._gaps: list[ArenaEntry] = []
        self._end = 0  # where the next cast goes, from the data's start
        self._pending = 0  # tensors read and not cast yet
        self._lock = threading.Lock()  # transformers may read in a thread pool

    @classmethod
    def start(cls, name: str, files: Sequence[Path]) -> CastArena:
        return cls(name, data_start_for(sections(files)))

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Within: transformers' loads cast into the arena (see the module's docstring)."""
        from transformers import core_model_loading as steps

        read = getattr(steps, "_materialize_copy", None)
        put = getattr(steps, "set_param_for_module", None)
        if read is None or put is None:  # another transformers: the usual path
            log.debug("%s: transformers has no loading steps to cast into the arena", self.name)
            yield
            return

        def read_later(tensor: Any, device: Any = None, dtype: Any = None) -> torch.Tensor:
            if dtype is None or not _host(device):
                return read(tensor, device, dtype)
            out: torch.Tensor = tensor[...]
            setattr(out, _CAST_TO, dtype)
            with self._lock:
                self._pending += 1
            return out

        def put_cast(model: Any, target_name: str, value: Any, info: Any, quantizer: Any) -> Any:
            dtype = self._unmark(value)
            if dtype is not None:
                value = self._cast(model, target_name, value, dtype)
            return put(model, target_name, value, info, quantizer)

        converter = getattr(steps, "WeightConverter", None)
        own = converter is not None and "materialize_tensors" in vars(converter)
        gather = getattr(converter, "materialize_tensors", None)

        def gather_cast(this: Any) -> Any:  # a converter's ops make new tensors: cast first
            assert gather is not None
            gathered = gather(this)
            for key, values in gathered.items():
                gathered[key] = [self._cast_now(value) for value in values]
            return gathered

        steps._materialize_copy = read_later
        steps.set_param_for_module = put_cast  # type: ignore[assignment]
        if converter is not None and gather is not None:
            converter.materialize_tensors = gather_cast
        try:
            yield
        finally:
            steps._materialize_copy, steps.set_param_for_module = read, put
            if converter is not None and gather is not None:
                if own:
                    converter.materialize_tensors = gather
                else:
                    del converter.materialize_tensors
        if self._pending:  # a conversion step in between: some tensors kept the file's dtype
            raise RuntimeError(
                f"{self._pending} tensors were read for a cast into the arena and never set"
            )

    def _unmark(self, value: Any) -> torch.dtype | None:
        """The dtype a tensor read for a cast later is to get (counted as cast from now);
        None for anything else."""
        dtype = getattr(value, _CAST_TO, None)
        if not isinstance(value, torch.Tensor) or dtype is None:
            return None
        with self._lock:
            self._pending -= 1
        return dtype

    def _cast_now(self, value: Any) -> Any:
        """A tensor read for a cast later, cast now as transformers would (a converter's
        input); anything else as it is."""
        dtype = self._unmark(value)
        return value if dtype is None else value.to(dtype=dtype)

    def _cast(self, model: Any, name: str, value: torch.Tensor, dtype: torch.dtype) -> Any:
        if self._reserved is None:
            self._reserved = self._reserve(model)
        nbytes = value.numel() * dtype.itemsize
        offset = -(-self._end // dtype.itemsize) * dtype.itemsize
        if (
            not nbytes
            or name in self._slots
            or dtype not in DTYPE_CODES
            or offset + nbytes > self._reserved
        ):
            return value.to(dtype=dtype)  # appended to the arena later, if the model keeps it
        assert self.fd is not None and self._mapping is not None
        try:
            self._write_cast(value, dtype, self.data_start + offset)
        except OSError as exc:
            log.warning("%s: no more memory to cast into (%s); casting as usual", self.name, exc)
            self._reserved = 0
            with suppress(OSError):  # what this cast wrote goes now: no tensor will use it
                os.ftruncate(self.fd, self.data_start + self._end)
            return value.to(dtype=dtype)
        if offset > self._end:
            gap = f"{PADDING}.{len(self._gaps)}"
            size = offset - self._end
            self._gaps.append(
                ArenaEntry(name=gap, dtype="U8", shape=[size], offset=self._end, nbytes=size)
            )
        entry = ArenaEntry(
            name=name,
            dtype=DTYPE_CODES[dtype],
            shape=list(value.shape),
            offset=offset,
            nbytes=nbytes,
        )
        target = torch.frombuffer(
            self._mapping, dtype=torch.uint8, count=nbytes, offset=self.data_start + offset
        )
        target = target.view(dtype).view(value.shape)
        self._slots[name] = (entry, target)
        self._end = offset + nbytes
        return target

    def _write_cast(self, value: torch.Tensor, dtype: torch.dtype, where: int) -> None:
        """`value` cast to `dtype`, written into the memfd at `where`, a buffer at a time
        (the cast stays in the cache; the kernel allocates the arena's pages as it copies)."""
        assert self.fd is not None
        if self._staging is None:
            self._staging = torch.empty(_STAGING, dtype=torch.uint8)
        raw = self._staging.numpy().data
        staging = self._staging.view(dtype)
        flat = value.reshape(-1)
        for begin in range(0, flat.numel(), staging.numel()):
            count = min(staging.numel(), flat.numel() - begin)
            staging[:count].copy_(flat[begin : begin + count])
            write_all(self.fd, raw[: count * dtype.itemsize], where + begin * dtype.itemsize)

    def _reserve(self, model: Any) -> int:
        """Room for every parameter still on the meta device (those transformers ties to
        another aside) in the dtype it has there; 0 (everything is cast as transformers
        would) when the memfd cannot be mapped. A cast that finds no room left (a module
        kept in float32 that the meta device holds in 16 bits) is cast as usual."""
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # {target: source}
        room = sum(
            tensor.numel() * tensor.element_size() + 8  # + its alignment, at most
            for name, tensor in model.named_parameters()
            if tensor.device.type == "meta" and name not in tied
        )
        if not room:
            return 0
        try:
            self.fd = new_memfd(self.name)
            os.ftruncate(self.fd, self.data_start + room)  # no page of it taken yet
            self._mapping = mmap.mmap(self.fd, self.data_start + room, mmap.MAP_PRIVATE)
            self._addresses = _addresses(self._mapping)
        except OSError as exc:
            log.warning("%s: no arena to cast into (%s); casting as usual", self.name, exc)
            self._mapping = None
            self._close_fd()
            return 0
        return room

    def adopt(
        self, tensors: dict[str, torch.Tensor], placed: Placed
    ) -> tuple[Arena, mmap.mmap] | None:
        """The arena with every tensor of `tensors` in it and `placed(name, view)` called for
        each, as `stream_arena` does; None (nothing changed) when it does not fit."""
        layout = self._layout(tensors)
        if layout is None:
            return None
        entries, extras = layout
        try:
            changed = anonymous_bytes(self._addresses)
        except OSError as exc:  # no page table to read here (a sandbox): assume the worst
            log.info("%s: cannot tell whether a cast changed (%s)", self.name, exc)
            changed = 1
        if changed:
            log.info("%s: a cast may have changed in place: the usual path", self.name)
            return None
        fd, data_start = self.fd, self.data_start
        assert fd is not None
        written = write_rest(fd, data_start, entries, extras, tensors, placed)
        if written is None:
            return None
        size, mapping = written
        self._slots, self._mapping = {}, None  # the model holds views of `mapping` now
        seal(fd)
        self.fd = None  # the arena's now
        log.debug("%s: cast into the arena as transformers loaded", self.name)
        return Arena(fd, f"basehold:{self.name}", size, data_start, entries), mapping

    def _layout(
        self, tensors: dict[str, torch.Tensor]
    ) -> tuple[list[ArenaEntry], list[ArenaEntry]] | None:
        """Each tensor's place: where it was cast into, else appended (`extras`); None when
        nothing was cast or a cast holds no tensor of the model's (bytes no tensor uses)."""
        if not self._slots or self.fd is None:
            return None
        by_address = {view.data_ptr(): (entry, view) for entry, view in self._slots.values()}
        entries: list[ArenaEntry] = list(self._gaps)
        rest: list[tuple[str, torch.Tensor]] = []
        used: set[int] = set()
        for name, tensor in tensors.items():
            slot = by_address.get(tensor.data_ptr()) if tensor.device.type == "cpu" else None
            if (
                slot is None
                or slot[0].offset in used
                or slot[1].dtype != tensor.dtype
                or slot[1].shape != tensor.shape
                or not tensor.is_contiguous()
            ):
                rest.append((name, tensor))
                continue
            used.add(slot[0].offset)
            entries.append(slot[0].model_copy(update={"name": name}))
        if len(used) != len(self._slots):
            return None
        extras = appended(rest, self._end)
        return [*entries, *extras], [e for e in extras if e.name != PADDING]

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Let go of the memfd, unless `adopt` made it the arena. The copy-on-write mapping
        goes once no tensor refers to it (never unmapped under a tensor)."""
        self._slots, self._mapping = {}, None
        self._close_fd()


def _addresses(mapping: mmap.mmap) -> range:
    """The addresses a writable mapping takes in this process."""
    first = ctypes.c_char.from_buffer(mapping)  # an export: dropped before anyone closes it
    start = ctypes.addressof(first)
    del first
    return range(start, start + len(mapping))


def _host(device: Any) -> bool:
    if device is None:
        return True
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):
        return False  # "disk" and the like
