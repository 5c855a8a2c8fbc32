"""What a crashed instance of this state directory left behind, and how to recognise it.

Called once at start, with the state lock held: nothing else can be using these files.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def clean_offload(offload_dir: Path, keep: frozenset[str] = frozenset()) -> int:
    """Remove every disk-offload folder (one per load; only loads of this process use them)
    but those of the loads in `keep` (held already: handed over by a predecessor)."""
    removed = 0
    if not offload_dir.is_dir():
        return 0
    for entry in offload_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
