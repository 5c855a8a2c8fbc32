"""Will a download fit? The free space of the disk under the HF cache, against what a load
will fetch and what downloads in flight will still write."""

from __future__ import annotations

import shutil
from pathlib import Path

from service.common.errors import InsufficientStorage


def free_bytes(folder: Path) -> int:
    """Free bytes of the disk `folder` is (or will be) on: its nearest existing ancestor's."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def require_room(cache: Path, needed: int, what: str, free: int, in_flight: int = 0) -> None:
    """Raise InsufficientStorage unless `needed` bytes fit in the `free` bytes of the
    cache's disk once the downloads in flight wrote their remaining `in_flight` bytes."""
    if needed <= 0 or needed + in_flight <= free:
        return
    others = f", {in_flight} of them to be written by downloads in flight" if in_flight else ""
    raise InsufficientStorage(
        f"Downloading {what} needs {needed} bytes in the HF cache {cache}, which has {free} "
        f"bytes free{others}. Free space there, or point HF_HUB_CACHE at a larger disk"
        + (", or load it once the other downloads are done." if in_flight else ".")
    )
