"""What a local load was priced at, remembered while nothing it depends on changed.

A model loaded, unloaded (or evicted) and asked for again would be priced again at
submit, which costs a process: a fork, the checkpoint's config and headers read, a
skeleton built on `meta`. The price depends on the normalized spec and the checkpoint's
files alone when the placement does not depend on free memory (a `device_map` of "cpu",
"cuda:N" or a dict, `max_memory` given, or no GPU on the node), so it is kept, keyed by the
spec and each file's name, size, mtime and inode; a file written, replaced, added or
removed makes a new key. The load itself still checks the checkpoint in full before it
reads a weight, so a price taken from here never skips a check.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from service.common.cuda import CudaProbe
from service.common.estimates import Estimate
from service.common.load.spec import LoadRequest

Files = tuple[tuple[str, int, int, int], ...]
PriceKey = tuple[str, Files]


def _fixed_placement(spec: LoadRequest, gpus: int) -> bool:
    """Whether where accelerate puts each module depends on the spec alone: a named device
    or a map, `max_memory` given, or a strategy on a node without GPUs (all on the host).
    Else it follows each GPU's free memory at the time."""
    device_map = spec.device_map
    if isinstance(device_map, dict) or device_map == "cpu" or device_map.startswith("cuda:"):
        return True
    return spec.max_memory is not None or gpus == 0


def files_of(folder: Path) -> Files | None:
    """Name, size, mtime and inode of each file in `folder` (links followed); None where
    the folder cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            found = []
            for entry in entries:
                stat = entry.stat()
                found.append((entry.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    except OSError:
        return None
    return tuple(sorted(found))


class Prices:
    def __init__(self, cuda: CudaProbe, size: int = 256) -> None:
        """`cuda`: the serving process's view of the node's GPUs (whether placements follow
        free memory)."""
        self._cuda = cuda
        self._size = size
        self._known: OrderedDict[PriceKey, Estimate] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, spec: LoadRequest, spec_key: str) -> PriceKey | None:
        """What the price of `spec` depends on, read before it is priced (a file changed
        while it was priced makes the next key differ); None: not kept."""
        if not spec.source.startswith("/"):
            return None  # hub sources move with their revision
        if not _fixed_placement(spec, self._cuda.device_count()):
            return None  # "auto" on GPUs follows their free memory
        files = files_of(Path(spec.source))
        return None if files is None else (spec_key, files)

    def get(self, key: PriceKey | None) -> Estimate | None:
        if key is None:
            return None
        with self._lock:
            found = self._known.get(key)
            if found is not None:
                self._known.move_to_end(key)
            return found

    def put(self, key: PriceKey | None, estimate: Estimate) -> None:
        if key is None:
            return
        with self._lock:
            self._known[key] = estimate
            self._known.move_to_end(key)
            while len(self._known) > self._size:
                self._known.popitem(last=False)
