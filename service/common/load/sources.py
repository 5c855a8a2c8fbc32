"""Where a checkpoint comes from: a local directory under an allowed root, or the Hub."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils._validators import validate_repo_id

from service.common.errors import InvalidSpec, SourceNotAllowed, SourceNotFound
from service.common.handles.descriptor import Provenance
from service.common.load.hub_checks import check_revision
from service.common.load.spec import BaseModelRef


@dataclass(frozen=True)
class LocalSource:
    path: Path


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str


Source = LocalSource | HubSource


@dataclass(frozen=True)
class HubOptions:
    endpoint: str | None = None  # a mirror or stand-in; None: HF_ENDPOINT / the Hub
    retries: int = 4  # download attempts after the first, with exponential backoff
    backoff: float = 2.0  # seconds before the first retry
    workers: int = 8  # files downloaded in parallel


def provenance_of(
    source: str, revision: str | None, base_model: BaseModelRef | None = None
) -> Provenance:
    if not source.startswith("/"):
        return Provenance(source=source, hub_id=source, revision=revision)
    if base_model is not None:
        return Provenance(source=source, hub_id=base_model.hub_id, revision=base_model.revision)
    return Provenance(source=source)


def parse_source(source: str, revision: str | None, roots: list[Path]) -> Source:
    """Validate a request's `source` without touching the network."""
    if source.startswith(("~", ".")):
        raise InvalidSpec(f"Local sources must be absolute paths; got {source!r}.")
    if source.startswith("/"):
        _check_path_text(source)
        if revision is not None:
            raise InvalidSpec("`revision` applies to hub sources only; drop it for local paths.")
        return LocalSource(resolve_local(source, roots))
    try:
        validate_repo_id(source)
    except hub_errors.HFValidationError as exc:
        raise InvalidSpec(
            f"{source!r} is neither an absolute local path nor a valid hub repo id ({exc})."
        ) from exc
    # A branch, tag or commit name (git's ref rules): huggingface_hub writes
    # `refs/<revision>` in the cache, and a `..` there is a path out of it.
    return HubSource(source, check_revision(revision) if revision else "main")


NAME_MAX = 255  # bytes in one path component (Linux)
PATH_MAX = 4096


def _check_path_text(source: str) -> None:
    """A path the kernel cannot take answers 400, before any filesystem call."""
    if "\x00" in source:
        raise InvalidSpec("`source` contains a NUL byte; send the checkpoint folder's path.")
    encoded = os.fsencode(source)
    if len(encoded) >= PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise InvalidSpec(
            f"`source` is longer than a path can be (each folder name at most {NAME_MAX} "
            f"bytes, the whole path under {PATH_MAX}); send the checkpoint folder's path."
        )


def within(path: Path, roots: Sequence[Path]) -> bool:
    """Whether the (resolved) `path` is one of `roots` or lies under one."""
    return any(path == root or root in path.parents for root in roots)


def resolve_local(source: str, roots: list[Path]) -> Path:
    if ".." in Path(source).parts:
        raise SourceNotAllowed(f"{source!r} contains '..'. Use a plain absolute path.")
    path = Path(source).resolve()
    if not within(path, roots):
        shown = ", ".join(str(r) for r in roots)
        raise SourceNotAllowed(
            f"{source} resolves outside the allowed model roots ({shown}). Put the checkpoint "
            "under one of them (symlinks that leave them are refused) or add a root with "
            "BASEHOLD_MODEL_ROOTS."
        )
    if not path.is_dir():
        raise SourceNotFound(f"{source} is not a directory. Check the path.")
    return path


def hub_cache_dir() -> str:
    """The standard HF cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return str(hub_constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(hub_constants.HF_HUB_OFFLINE) or value.upper() in {"1", "ON", "YES", "TRUE"}
