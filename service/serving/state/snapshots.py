"""Snapshots: a held model's arena kept on disk, so that a start holds it again at once,
without a loader (no template to wait for, nothing to cast or quantize again).

Once a model that lives in host memory alone is ready (an arena; no device segment, no
runner), a background thread copies its arena into `<state dir>/snapshots/<id>.arena`
(the kernel copies: `sendfile`; the file is synced, then its pages are dropped from the page
cache) and then writes `<id>.json` beside it: its load's id and facts, its spec key, and the
size and mtime of every file of its checkpoint. A start takes a recorded model from its
snapshot when all of that still agrees (the same id, spec key and loader protocol, the
checkpoint's files unchanged, an arena file of the recorded size whose safetensors header
lists the recorded tensors): the arena is copied into a new sealed memfd before the
service serves, and the model is ready as a handed-over one is. Anything else drops the
snapshot and loads the model as usual.

A snapshot goes when its model does (unloaded, evicted, failed, a load cancelled); one the
state database no longer records is removed at the next start. A snapshot is written only
when it takes at most half the disk space left (`SHARE`). A SIGTERM leaves snapshots as
they are, as it leaves the database's rows. With snapshots turned off
(`BASEHOLD_SNAPSHOTS=false`), a plain start removes them all.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import queue
import shutil
import stat
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.common.cores import usable_cores
from service.common.handles.descriptor import ArenaEntry, Handle
from service.common.handles.memfd import new_memfd, seal
from service.common.protocol.held import Held
from service.common.protocol.messages import PROTOCOL_VERSION
from service.common.protocol.wire import close_fds
from service.serving.handover.messages import HANDLE_VERSION, OfferedModel
from service.serving.registry.record import Adopted, ModelRecord
from service.serving.registry.states import State

log = logging.getLogger("basehold.snapshots")

FOLDER = "snapshots"
SHARE = 0.5  # of the disk space left: a larger snapshot is not written
_INFO_BYTES = 64 * 2**20  # a larger description is not one this service wrote
_CHUNK = 64 * 2**20  # bytes per sendfile call: a stop is heard between two
_DROPPED = frozenset({State.UNLOADING, State.CANCELLED, State.FAILED})  # as the database does


class SourceFile(BaseModel):
    """One file of the checkpoint a snapshot was loaded from, as it was then."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int
    mtime_ns: int


class SnapshotInfo(BaseModel):
    """`<id>.json`: what the arena file beside it holds and what it was loaded from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[2] = 2  # 2: with the arena's checksums
    protocol: int
    spec_key: str
    size: int = Field(ge=8)
    model: OfferedModel
    sources: list[SourceFile]
    # The CRC-32 of each `chunk_bytes` of the arena file (the last chunk shorter), checked
    # after each restore, chunks in parallel.
    chunk_bytes: int = Field(gt=0)
    crc32: list[Annotated[int, Field(ge=0, lt=2**32)]]


class SnapshotUnusable(ValueError):
    """A snapshot that does not (or no longer) match what it claims to hold."""


class _NotAdmitted(Exception):
    """The memory a snapshot needs is not there now (or admitting it failed): the model is
    loaded (and priced) instead, the snapshot kept."""


# This process's memory or fds running out (while the copy is made: its memfd, its
# mapping, its files), not anything wrong with the snapshot.
_NO_ROOM = frozenset({errno.ENOMEM, errno.ENOSPC, errno.EMFILE, errno.ENFILE})


def _admitted(model_id: str, admit: Callable[[int], bool], size: int) -> bool:
    """`admit(size)`; False (the snapshot kept: nothing is wrong with it) when it fails."""
    try:
        return admit(size)
    except Exception:
        log.exception("admitting %s's restore failed: loading it, its snapshot kept", model_id)
        return False


def _open_regular(path: Path) -> int:
    """`path` opened for reading where it is a regular file of its own (not a link); a FIFO
    or device put in its place raises at once instead of blocking the start that reads it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotUnusable(f"{path.name} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def checkpoint_files(folder: Path) -> list[SourceFile]:
    """Every file under the checkpoint folder (symlinks followed: the hub cache's blobs),
    with its size and mtime: a snapshot is valid while these are unchanged."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            relative = str(path.relative_to(folder))
            files.append(SourceFile(path=relative, size=stat.st_size, mtime_ns=stat.st_mtime_ns))
    return files


def host_handle(held: Held) -> Handle | None:
    """The handle of a model held in its arena alone (what a snapshot can keep), or None."""
    handle = held.placed.handle
    if held.needs_runner or handle is None or handle.segments:
        return None
    return handle


def copy_fd(
    source: int,
    target: int,
    size: int,
    cancelled: Callable[[], bool] = lambda: False,
    *,
    uncache_source: bool = False,
) -> None:
    """`size` bytes from the start of `source` to the start of `target`, in the kernel
    (InterruptedError once `cancelled()`, asked between chunks). `uncache_source`: drop each
    chunk read from the page cache (a file read once)."""
    done = 0
    while done < size:
        if cancelled():
            raise InterruptedError("cancelled")
        sent = os.sendfile(target, source, done, min(_CHUNK, size - done))
        if sent == 0:
            raise SnapshotUnusable(f"the file ended after {done} of {size} bytes")
        if uncache_source:
            os.posix_fadvise(source, done, sent, os.POSIX_FADV_DONTNEED)
        done += sent


def checksums(
    fd: int,
    size: int,
    chunk_bytes: int = _CHUNK,
    cancelled: Callable[[], bool] = lambda: False,
    workers: int = 1,
) -> list[int]:
    """The CRC-32 of each `chunk_bytes` of the first `size` bytes of `fd` (the last chunk
    shorter), read through a read-only mapping by `workers` threads (zlib lets go of the
    GIL: ~1.4–2.4 GB/s a core here); InterruptedError once `cancelled()`, asked before
    each chunk."""
    if not size:
        return []
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping:

        def one(start: int) -> int:
            if cancelled():
                raise InterruptedError("cancelled")
            with memoryview(mapping)[start : start + chunk_bytes] as chunk:
                return zlib.crc32(chunk)

        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="checksum") as pool:
            return list(pool.map(one, range(0, size, chunk_bytes)))


def check_header(fd: int, data_start: int, entries: list[ArenaEntry]) -> None:
    """The arena file's safetensors header lists every one of `entries` where it says, in
    the `data_start` bytes before the data."""
    length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if not 0 < length <= data_start - 8:
        raise SnapshotUnusable(f"a header of {length} bytes")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except ValueError as exc:
        raise SnapshotUnusable(f"an unreadable header ({exc})") from None
    for entry in entries:
        due = {
            "dtype": entry.dtype,
            "shape": entry.shape,
            "data_offsets": [entry.offset, entry.offset + entry.nbytes],
        }
        if header.get(entry.name) != due:
            raise SnapshotUnusable(f"its header does not list {entry.name!r} as recorded")


def drop_all(folder: Path) -> None:
    """Remove every snapshot (snapshots turned off: none is kept or used)."""
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("snapshots are off: removed %s", folder)


@dataclass(frozen=True)
class _Written:
    """An arena copied to `partial` (its size, its checksums, and the checkpoint's files as
    they were when it was copied), not published yet."""

    partial: Path
    size: int
    sources: list[SourceFile]
    crc32: list[int]


@dataclass
class _Save:
    """One model's snapshot to write; `let_go` cancels it (and waits while it copies)."""

    entry: OfferedModel
    spec_key: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    copying: bool = False


class Snapshots:
    """The snapshots in `folder`. `arena_fds(load_id)`: new fds of a held load's arena and
    segments (the caller closes them)."""

    def __init__(self, folder: Path, arena_fds: Callable[[str], list[int]]) -> None:
        self.folder = folder
        self._arena_fds = arena_fds
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._saves: dict[str, _Save] = {}  # by load id, queued or being written
        self._thread = threading.Thread(target=self._work, name="snapshots", daemon=True)
        self._thread.start()

    # -- restoring -------------------------------------------------------------------
    def has(self, model_id: str) -> bool:
        return self._info(model_id).exists()

    def take(
        self,
        model_id: str,
        spec_key: str,
        cancelled: Callable[[], bool] = lambda: False,
        admit: Callable[[int], bool] = lambda size: True,
    ) -> Adopted | None:
        """The recorded model `model_id` from its snapshot, held in a new sealed memfd;
        None (its snapshot removed, if any) when there is none that still agrees; None
        (kept) when `admit(its size)` says no (or fails) before the copy, this process has
        no memory or fds for the copy now, or the copy was `cancelled()`."""
        info_path = self._info(model_id)
        if not info_path.is_file():
            return None
        try:
            return self._take(model_id, spec_key, info_path, cancelled, admit)
        except (InterruptedError, _NotAdmitted):
            return None
        except Exception as exc:  # whatever it is, the model is loaded instead
            kept = isinstance(exc, OSError) and exc.errno in _NO_ROOM
            if not kept:
                self._remove(model_id)
            log.warning(
                "not restoring %s from its snapshot (%s): loading it%s",
                model_id,
                exc,
                ", the snapshot kept" if kept else "",
            )
            return None

    def _take(
        self,
        model_id: str,
        spec_key: str,
        info_path: Path,
        cancelled: Callable[[], bool],
        admit: Callable[[int], bool],
    ) -> Adopted:
        info = self._description(info_path)
        model = info.model
        if model.id != model_id or info.spec_key != spec_key:
            raise SnapshotUnusable("it holds another model or spec")
        if info.protocol != PROTOCOL_VERSION:
            raise SnapshotUnusable(f"loader protocol {info.protocol}, {PROTOCOL_VERSION} here")
        handle = host_handle(Held.from_manifest(model.facts))
        if handle is None or handle.arena.size != info.size:
            raise SnapshotUnusable("its facts are not those of an arena of its size")
        if handle.version != HANDLE_VERSION:
            raise SnapshotUnusable(f"handle version {handle.version}, {HANDLE_VERSION} here")
        if checkpoint_files(model.facts.checkpoint) != info.sources:
            raise SnapshotUnusable("its checkpoint's files changed since")
        source = _open_regular(self._arena(model_id))
        try:
            if os.fstat(source).st_size != info.size:
                raise SnapshotUnusable(f"{os.fstat(source).st_size} bytes, {info.size} due")
            check_header(source, handle.arena.data_start, handle.entries)
            if not _admitted(model_id, admit, info.size):
                raise _NotAdmitted
            fd = new_memfd(handle.arena.name.removeprefix("basehold:"))
            try:
                copy_fd(source, fd, info.size, cancelled, uncache_source=True)
                seal(fd)
                found = checksums(
                    fd, info.size, info.chunk_bytes, cancelled, workers=usable_cores()
                )
                if found != info.crc32:
                    raise SnapshotUnusable("its bytes do not match their checksums")
            except BaseException:
                os.close(fd)
                raise
        finally:
            os.close(source)
        log.info("restored %s from its snapshot (%.0f MiB)", model_id, info.size / 2**20)
        return Adopted(model.load_id, model.facts, [fd], model.started_at, model.ready_at)

    def keep_only(self, model_ids: Iterable[str]) -> int:
        """Remove the snapshots (and half-written files) of models not in `model_ids`;
        returns how many models' snapshots went."""
        keep = set(model_ids)
        gone: set[str] = set()
        for path in self.folder.glob("*"):
            model_id = path.name.lstrip(".").rsplit(".", 1)[0]
            if path.name.startswith(".") or model_id not in keep:
                with suppress(OSError):
                    path.unlink()
                gone.add(model_id)
        return len(gone)

    # -- while serving -----------------------------------------------------------------
    def on_transition(self, record: ModelRecord, previous: State, target: State) -> None:
        """A registry listener (called under its lock: queues the work, does none)."""
        if target == previous or self._stopped.is_set():
            return
        if target == State.READY and record.loaded is not None and host_handle(record.loaded):
            save = _Save(OfferedModel.of(record, record.loaded, 1, None), record.key)
            self._saves[record.load_id] = save
            self._jobs.put(partial(self._save, save))
        elif target in _DROPPED:
            # A restored model let go of before it was held again: its recorded snapshot
            # is of an earlier load.
            restored = record.restored_at is not None and previous != State.READY
            self._jobs.put(partial(self._drop, record.id, None if restored else record.load_id))

    def let_go(self, load_id: str, timeout: float = 10.0) -> None:
        """Its model is unloaded: no snapshot of `load_id` is written, and one being
        written lets go of the arena's memory (within one chunk) before this returns."""
        save = self._saves.get(load_id)
        if save is None:
            return
        with save.lock:
            save.cancel.set()
            copying = save.copying
        if copying:
            save.done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Hear nothing more (a shutdown keeps what is on disk); a snapshot being written
        is abandoned."""
        self._stopped.set()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        with suppress(OSError):  # this thread only: loads and requests come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while (job := self._jobs.get()) is not None:
            if self._stopped.is_set():
                return
            try:
                job()
            except InterruptedError:  # let go of, or stopped
                continue
            except Exception:
                log.exception("snapshot work failed; the models it was for stay held")

    def _save(self, save: _Save) -> None:
        entry = save.entry
        try:
            recorded = self._recorded(entry.id)
            if recorded is not None and recorded.model.load_id == entry.load_id:
                return  # restored from it, or handed over with it
            with save.lock:
                if save.cancel.is_set():
                    return
                try:
                    fds = self._arena_fds(entry.load_id)
                except Exception:  # let go of meanwhile
                    return
                save.copying = True
            try:
                written = self._copy(entry, fds[0], save.cancel.is_set)
            finally:
                close_fds(fds)  # before the sync: an unload waits for this, not the disk
        finally:
            save.done.set()
            self._saves.pop(entry.load_id, None)
        if written is not None:
            self._publish(entry, save, written)

    def _copy(self, entry: OfferedModel, fd: int, cancelled: Callable[[], bool]) -> _Written | None:
        """The arena copied to a file of this process's own; None where the disk has no
        room for it."""
        size = os.fstat(fd).st_size
        self.folder.mkdir(mode=0o700, exist_ok=True)
        disk = os.statvfs(self.folder)
        if size > SHARE * disk.f_bavail * disk.f_frsize:
            log.info("no snapshot of %s: it would take over half the disk space left", entry.id)
            return None
        sources = checkpoint_files(entry.facts.checkpoint)
        # Named for this process and load: a predecessor handing over may write one too.
        partial = self.folder / f".{entry.id}.{entry.load_id}.{os.getpid()}.arena"
        target = self._create(partial)
        stop = lambda: cancelled() or self._stopped.is_set()  # noqa: E731
        try:
            try:
                copy_fd(fd, target, size, stop)
            finally:
                os.close(target)
            crc32 = checksums(fd, size, _CHUNK, stop)  # of the arena in memory: what was copied
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return _Written(partial, size, sources, crc32)

    def _publish(self, entry: OfferedModel, save: _Save, written: _Written) -> None:
        """Sync the copied arena to the disk, then put it and its description in place,
        unless its model was let go of meanwhile."""
        partial, size = written.partial, written.size
        try:
            target = _open_regular(partial)
            try:
                os.fsync(target)
                os.posix_fadvise(target, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(target)
            if save.cancel.is_set() or self._stopped.is_set():
                return
            info = SnapshotInfo(
                protocol=PROTOCOL_VERSION,
                spec_key=save.spec_key,
                size=size,
                model=entry,
                sources=written.sources,
                chunk_bytes=_CHUNK,
                crc32=written.crc32,
            )
            self._remove(entry.id)  # an older load's: never beside this load's arena
            os.replace(partial, self._arena(entry.id))
            described = partial.with_suffix(".json")
            description = self._create(described)
            with os.fdopen(description, "w") as file:
                file.write(info.model_dump_json())
            os.replace(described, self._info(entry.id))
        finally:
            partial.unlink(missing_ok=True)
        log.info("snapshot of %s written (%.0f MiB)", entry.id, size / 2**20)

    @staticmethod
    def _create(path: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path, flags, 0o600)

    def _drop(self, model_id: str, load_id: str | None) -> None:
        """`load_id` None: the model's, whatever load it records."""
        recorded = self._recorded(model_id)
        if recorded is None or load_id is None or recorded.model.load_id == load_id:
            self._remove(model_id)

    def _recorded(self, model_id: str) -> SnapshotInfo | None:
        try:
            return self._description(self._info(model_id))
        except (OSError, ValidationError, SnapshotUnusable):
            return None

    @staticmethod
    def _description(path: Path) -> SnapshotInfo:
        with os.fdopen(_open_regular(path), "rb") as file:
            return SnapshotInfo.model_validate_json(file.read(_INFO_BYTES))

    def _remove(self, model_id: str) -> None:
        for path in (self._info(model_id), self._arena(model_id)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove the snapshot file %s: %s", path, exc)

    def _info(self, model_id: str) -> Path:
        return self.folder / f"{model_id}.json"

    def _arena(self, model_id: str) -> Path:
        return self.folder / f"{model_id}.arena"
