"""A snapshot's own checks, on real arenas: its header against the entries it claims, and
which files a start keeps."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

from service.common.handles.arena import write_arena
from service.serving.state.snapshots import (
    Snapshots,
    SnapshotUnusable,
    check_header,
    checksums,
)


def test_the_header_must_list_every_entry_where_it_says() -> None:
    arena = write_arena(
        "t", {"a": torch.ones(3, 4), "b.weight": torch.zeros(5, dtype=torch.bfloat16)}
    )
    try:
        check_header(arena.fd, arena.data_start, arena.entries)  # as written: agrees
        moved = [e.model_copy(update={"offset": e.offset + 2}) for e in arena.entries]
        with pytest.raises(SnapshotUnusable, match="does not list"):
            check_header(arena.fd, arena.data_start, moved)
        renamed = [e.model_copy(update={"name": e.name + "x"}) for e in arena.entries]
        with pytest.raises(SnapshotUnusable, match="does not list"):
            check_header(arena.fd, arena.data_start, renamed)
        with pytest.raises(SnapshotUnusable, match="a header of"):
            check_header(arena.fd, 16, arena.entries)  # it would not fit before the data
    finally:
        os.close(arena.fd)


def test_a_start_keeps_the_snapshots_of_recorded_models_only(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    names = ["m.v1.arena", "m.v1.json", "gone.arena", "gone.json", ".m.v1.arena", ".x.json"]
    for name in names:
        (folder / name).write_bytes(b"x")
    snapshots = Snapshots(folder, lambda load_id: [])
    try:
        assert snapshots.keep_only(["m.v1"]) == 3  # gone; the half-written m.v1 and x
        assert sorted(p.name for p in folder.iterdir()) == ["m.v1.arena", "m.v1.json"]
        assert snapshots.has("m.v1") and not snapshots.has("gone")
        assert snapshots.take("m.v1", "key") is None  # not a description: removed
        assert list(folder.iterdir()) == []
    finally:
        snapshots.stop()


def test_checksums_are_each_chunks_crc_in_order_whatever_the_threads() -> None:
    data = os.urandom(4096 * 3 + 123)
    fd = os.memfd_create("checksums")
    try:
        os.write(fd, data)
        expected = [zlib.crc32(data[i : i + 4096]) for i in range(0, len(data), 4096)]
        for workers in (1, 3):
            assert checksums(fd, len(data), 4096, workers=workers) == expected
        assert checksums(fd, 0) == []
        with pytest.raises(InterruptedError):
            checksums(fd, len(data), 4096, cancelled=lambda: True)
    finally:
        os.close(fd)
