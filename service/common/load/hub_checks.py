"""What a request's revision and a hub's answers must look like before any of it names a
path in the HF cache. The endpoint may be a mirror or a plain-http proxy, not the Hub over
TLS: a commit, an ETag or a file name it sends is a path segment to huggingface_hub
(`refs/<revision>`, `trees/<commit>.json`, `blobs/<etag>`, `snapshots/<commit>/<name>`),
so each is held to the shape the Hub gives it, and sizes to what a checkpoint needs."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from service.common.errors import DownloadFailed, InvalidSpec

REVISION_MAX = 255  # bytes; git refs have no limit, the Hub's names are short
NAME_MAX = 255  # bytes in one path component (Linux)
PATH_MAX = 4096

# config.json and its kind (generation_config.json, preprocessor_config.json, ...) are read
# whole into memory to price a load: 8 MiB holds the largest label maps (21k ImageNet
# classes, ~1.3 MB) several times over.
CONFIG_MAX_BYTES = 8 << 20
# Tokenizer files and other text: 64 MiB, the cap on what GET /files serves
# (`files.MAX_FILE_BYTES`). The largest tokenizer.json on the Hub is a few tens of MiB
# (Gemma 3's is 33 MB).
SMALL_MAX_BYTES = 64 << 20
SMALL_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".py", ".yaml", ".yml")

_COMMIT = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a git blob id, or an LFS sha256
# git check-ref-format: no control characters, space, ~ ^ : ? * [ or backslash.
_NOT_IN_REFS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_DRIVE = re.compile(r"[A-Za-z]:")


class HubAnswerRefused(DownloadFailed):
    """The hub answered something the Hub never would (a commit that is not a sha, an ETag
    that is a path, a body longer than it listed): nothing of that answer is written."""


def shown(value: str, limit: int = 80) -> str:
    """A hub's or a client's string, quoted and bounded, fit for a message or a log."""
    return repr(value[:limit] + ("…" if len(value) > limit else ""))


def is_commit(value: str) -> bool:
    return _COMMIT.fullmatch(value) is not None


def is_etag(value: str) -> bool:
    return _ETAG.fullmatch(value) is not None


def revision_problem(revision: str) -> str | None:
    """Why `revision` is not a branch, tag or commit name (git's ref rules), if it is not."""
    if not revision:
        return "it is empty"
    if not revision.isascii() or len(revision) > REVISION_MAX:
        return f"it must be ASCII and at most {REVISION_MAX} characters"
    if _NOT_IN_REFS.search(revision):
        return "it contains a space, a control character or one of ~ ^ : ? * [ \\"
    if revision.startswith(("/", "-")) or revision.endswith(("/", ".")):
        return "it starts with / or -, or ends with / or ."
    if "//" in revision or ".." in revision or "@{" in revision or revision == "@":
        return "it contains //, .. or @{"
    if any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        return "a part of it starts with . or ends with .lock"
    return None


def check_revision(revision: str) -> str:
    if (problem := revision_problem(revision)) is not None:
        raise InvalidSpec(
            f"`revision` {shown(revision)} is not a branch, tag or commit name: {problem}. "
            "Send a name such as main, v1.0 or refs/pr/12, or a 40-hex commit."
        )
    return revision


def file_name_problem(name: str) -> str | None:
    """Why `name` is not a relative path inside a repo's snapshot, if it is not."""
    try:
        encoded = name.encode()
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if not name:
        return "it is empty"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "it contains a control character (NUL, newline, ...)"
    if "\\" in name or _DRIVE.match(name):
        return "it contains a backslash or names a drive"
    if name.startswith("/"):
        return "it is absolute"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "it has an empty, . or .. part"
    if len(encoded) >= PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        return "it is longer than a path can be"
    return None


def size_cap(name: str) -> int | None:
    """The most bytes a file of this name may have; None: weights and other data (their
    listed size, checked against the disk, and counted as they arrive)."""
    base = name.rsplit("/", 1)[-1]
    if base == "config.json" or (base.endswith("_config.json") and "tokenizer" not in base):
        return CONFIG_MAX_BYTES
    if base.endswith(SMALL_SUFFIXES):
        return SMALL_MAX_BYTES
    return None


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, links and `..` resolved (as far as it exists), lies under `root`."""
    resolved = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    return base in resolved.parents


def misfits(folder: Path, cache: Path, files: Iterable[tuple[str, int]]) -> list[str]:
    """The files of a snapshot `folder` that are missing, resolve outside `cache`, or whose
    size is not the one listed (`files`: name, size)."""
    found = []
    for name, size in files:
        path = folder / name
        try:
            ok = inside(path, cache) and path.is_file() and path.stat().st_size == size
        except OSError:
            ok = False
        if not ok:
            found.append(name)
    return found
