"""The checkpoint's small non-weight files a worker needs besides the weights: tokenizer
files, special tokens, chat template, generation and model config.

Served by name from the checkpoint folder only: never a weight file, never a subfolder,
never a file that resolves outside the allowed roots (checked again on every request: a
file swapped for a symlink after the load is refused too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

from service.errors import FileNotFound
from service.loading.sources import within

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


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _checked(folder: Path, allowed: Sequence[Path], name: str) -> Path | None:
    if not servable(name):
        return None
    path = folder / name
    if not path.is_file() or not within(path.resolve(), allowed):
        return None
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    return path


def list_files(folder: Path, allowed: Sequence[Path]) -> list[CheckpointFile]:
    files = []
    for entry in sorted(folder.iterdir()):
        path = _checked(folder, allowed, entry.name)
        if path is not None:
            stat = path.stat()
            digest = _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            files.append(CheckpointFile(entry.name, stat.st_size, digest))
    return files


def file_path(folder: Path, allowed: Sequence[Path], name: str) -> Path:
    path = _checked(folder, allowed, name)
    if path is None:
        raise FileNotFound(
            f"{name[:200]!r} is not a file this checkpoint serves: only tokenizer, special "
            "tokens, chat template, generation and model config files are (GET "
            "/v1/models/{id}/files lists them); never weights."
        )
    return path
