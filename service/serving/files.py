"""The checkpoint's small non-weight files a worker needs besides the weights: tokenizer
files, special tokens, chat template, generation and model config.

Served by name from the checkpoint folder only, checked again on every request: a listed
name, a regular file with a single link (no symlink, except the HF cache's links into the
repo's own blobs; no hardlink of a file elsewhere), inside the allowed roots, and whose
bytes are not weights (safetensors, pickle, zip) or a database. Never a subfolder.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from service.common.errors import FileNotFound
from service.common.load.sources import within

MAX_FILE_BYTES = 64 << 20
NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.json",
        "chat_template.jinja",
    }
)
PATTERNS = (
    "tokenizer*.json",
    "*.model",  # sentencepiece: tokenizer.model, spiece.model, sentencepiece.bpe.model
    "*.tiktoken",
    "vocab*.txt",
    "vocab*.json",
    "merges*.txt",
    "chat_template*.jinja",
)


@dataclass(frozen=True)
class CheckpointFile:
    name: str
    size: int
    sha256: str


def servable(name: str) -> bool:
    if "/" in name or "\\" in name or name.startswith("."):
        return False
    return name in NAMES or any(fnmatch(name, pattern) for pattern in PATTERNS)


# Leading bytes of files that are weights or databases, never served whatever their name.
_MAGIC = (
    b"PK\x03\x04",  # torch.save zip
    b"SQLite format 3\x00",
    b"GGUF",
    b"\x93NUMPY",
    b"\x89HDF\r\n\x1a\n",
)


def _is_weights(head: bytes, size: int) -> bool:
    if head.startswith(_MAGIC):
        return True
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle
        return True
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and int.from_bytes(head[:8], "little") < size and head[8:9] == b"{"


def _hub_blob(path: Path, folder: Path) -> Path | None:
    """In the HF cache a snapshot's files are symlinks to the repo's blobs/: the one link
    that is followed, and only into that folder."""
    if folder.parent.name != "snapshots":
        return None
    blobs = folder.parent.parent / "blobs"
    target = path.resolve()
    return target if target.parent == blobs.resolve() else None


def _read_checked(folder: Path, allowed: Sequence[Path], name: str) -> bytes | None:
    """The file's bytes if it may be served: a listed name, a regular file with one link
    (no symlink, no hardlink to something elsewhere), inside the roots, not weights."""
    if not servable(name):
        return None
    path = folder / name
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            blob = _hub_blob(path, folder)
            if blob is None:
                return None
            path = blob
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            return None
        if info.st_size > MAX_FILE_BYTES or not within(path.resolve(), allowed):
            return None
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES or _is_weights(data[:16], len(data)):
        return None
    return data


def list_files(folder: Path, allowed: Sequence[Path]) -> list[CheckpointFile]:
    files = []
    for entry in sorted(folder.iterdir()):
        data = _read_checked(folder, allowed, entry.name)
        if data is not None:
            files.append(CheckpointFile(entry.name, len(data), hashlib.sha256(data).hexdigest()))
    return files


def read_file(folder: Path, allowed: Sequence[Path], name: str) -> bytes:
    data = _read_checked(folder, allowed, name)
    if data is None:
        raise FileNotFound(
            f"{name[:200]!r} is not a file this checkpoint serves: only tokenizer, special "
            "tokens, chat template, generation and model config files are (GET "
            "/v1/models/{id}/files lists them); never weights, links or anything else."
        )
    return data
