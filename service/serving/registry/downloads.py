"""Disk admission for hub downloads: a download must fit in the HF cache's free space once
the downloads already admitted wrote what they still have to."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from service.common.disk import require_room
from service.common.estimates import Download
from service.common.load.progress import Phase
from service.serving.registry.record import ModelRecord
from service.serving.registry.states import State


def in_flight(records: Iterable[ModelRecord], cache: str, exclude: str) -> dict[str, int]:
    """Bytes the admitted downloads into `cache` will still write, per snapshot (loads of
    one snapshot share its files: counted once)."""
    remaining: dict[str, int] = {}
    for record in records:
        download = record.estimate.download if record.estimate is not None else None
        if (
            download is None
            or download.cache != cache
            or record.id == exclude
            or record.state not in (State.QUEUED, State.LOADING)
        ):
            continue
        progress = record.progress
        if progress.phase is Phase.RESOLVING:  # not started: all of it
            left = download.bytes
        elif progress.phase is Phase.DOWNLOADING:
            left = max(0, progress.bytes_total - progress.bytes_done)
        else:  # downloaded
            left = 0
        remaining[download.snapshot] = max(remaining.get(download.snapshot, 0), left)
    return remaining


def require_disk(download: Download, records: Iterable[ModelRecord], exclude: str) -> None:
    """Raise InsufficientStorage unless `download` fits beside the downloads in flight
    (against the free space it was priced with: no disk probe here, under the lock)."""
    others = in_flight(records, download.cache, exclude)
    if download.snapshot in others:
        return  # its files are on their way already
    require_room(
        Path(download.cache), download.bytes, download.snapshot, download.free, sum(others.values())
    )
