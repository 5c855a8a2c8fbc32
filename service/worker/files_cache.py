"""Worker side: the checkpoint's small files (tokenizer, generation config, ...) fetched over
HTTP into a private cache, so a worker needs no view of the service's filesystem.

The cache lives in `$BASEHOLD_CACHE` (default `~/.cache/basehold`), one folder per model
and revision (hub loads) or per content digest (local loads). Every file is checked
against the SHA-256 the service lists and published by rename.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CacheUnwritable(PermissionError):
    """The files cache cannot be created or written: the message names BASEHOLD_CACHE."""


def cache_root() -> Path:
    configured = os.environ.get("BASEHOLD_CACHE")
    if configured:
        return Path(configured)
    try:
        return Path.home() / ".cache" / "basehold"
    except RuntimeError as exc:  # no HOME and no passwd entry (an arbitrary container uid)
        raise CacheUnwritable(
            f"no home folder for the basehold files cache ({exc}); set BASEHOLD_CACHE to a "
            "writable folder"
        ) from exc


def fetch_files(
    listing: dict[str, Any], download: Callable[[str], bytes], root: Path | None = None
) -> Path:
    """Make sure every listed file is in the cache; returns the model's cache folder.
    CacheUnwritable (naming BASEHOLD_CACHE) when the cache cannot be written."""
    base = root or cache_root()
    try:
        return _fetch(listing, download, base)
    except PermissionError as exc:
        if isinstance(exc, CacheUnwritable):
            raise
        raise CacheUnwritable(
            f"cannot write the basehold files cache in {base} ({exc.strerror}: "
            f"{exc.filename}); set BASEHOLD_CACHE to a writable folder"
        ) from exc
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        raise CacheUnwritable(
            f"the basehold files cache {base} is on a read-only filesystem; set "
            "BASEHOLD_CACHE to a writable folder"
        ) from exc


def _fetch(listing: dict[str, Any], download: Callable[[str], bytes], base: Path) -> Path:
    files = listing["files"]
    digest = hashlib.sha256(
        "".join(f"{f['name']}:{f['sha256']};" for f in files).encode()
    ).hexdigest()[:16]
    revision = listing.get("revision")
    key = f"{_component(str(revision))}-{digest}" if revision else digest
    folder = base / "files" / _component(str(listing["model_id"])) / key
    folder.mkdir(parents=True, exist_ok=True)
    for entry in files:
        name = str(entry["name"])
        if _component(name) != name:
            raise OSError(f"the service listed {name[:80]!r}, which is not a plain file name")
        target = folder / name
        if target.is_file() and _sha256(target.read_bytes()) == entry["sha256"]:
            continue
        data = download(name)
        if _sha256(data) != entry["sha256"]:
            raise OSError(f"{name} changed while it was fetched; try again")
        partial = folder / f".{name}.{os.getpid()}.partial"
        partial.write_bytes(data)
        partial.replace(target)
    return folder


def _component(text: str) -> str:
    """`text` as one safe path component: never '.', '..', a hidden name or a slash."""
    return _SAFE.sub("_", text).lstrip(".")[:128] or "_"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
