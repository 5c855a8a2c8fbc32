"""Look at a checkpoint directory before loading it: config present, weights complete.

Weight bytes come from the safetensors headers (exact), so progress has a real total and a
truncated or corrupt file is refused before transformers allocates anything.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service.common.errors import InvalidCheckpoint, SourceNotAllowed
from service.common.load.sources import within

_MAX_HEADER = 100 * 1024 * 1024
_REDO = "Re-download or re-save the checkpoint."
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    weight_files: tuple[Path, ...]
    bytes_total: int
    tensor_bytes: dict[str, int] = field(default_factory=dict)


def read_safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """Parse and verify one safetensors header against the file's real size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise InvalidCheckpoint(f"{path.name} is truncated (no header). {_REDO}")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise InvalidCheckpoint(
                f"{path.name} has a corrupt header (length {header_len}). {_REDO}"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidCheckpoint(
                f"{path.name} has a corrupt header ({exc}). Re-download or re-save it."
            ) from exc
    if not isinstance(header, dict):
        raise InvalidCheckpoint(f"{path.name} has a corrupt header. Re-download or re-save it.")
    data_len = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise InvalidCheckpoint(f"{path.name}: tensor {name[:200]!r} has no data_offsets.")
        begin, stop = offsets
        if not all(type(o) is int for o in offsets) or not 0 <= begin <= stop:
            raise InvalidCheckpoint(
                f"{path.name}: tensor {name[:200]!r} has data_offsets that are not two "
                f"ascending non-negative integers. {_REDO}"
            )
        end = max(end, stop)
    if end != data_len:
        raise InvalidCheckpoint(
            f"{path.name} is truncated or corrupt: the header describes {end} bytes of tensor "
            f"data but the file holds {data_len}. Re-download or re-save the checkpoint."
        )
    return header


def confine_folder(path: Path, allowed: Sequence[Path]) -> None:
    """Every file in the checkpoint folder must resolve inside `allowed` (the model roots,
    or the hub cache for hub snapshots): a symlink that leaves them is refused, whatever
    it is named, since a load (or a worker asking for the tokenizer) may read it."""
    for entry in path.iterdir():
        if not within(entry.resolve(), allowed):
            raise SourceNotAllowed(
                f"{entry.name} in the checkpoint is a link that leaves the allowed model "
                "roots. Replace it with the file itself, or add the folder it points to with "
                "BASEHOLD_MODEL_ROOTS."
            )


def _index_entry(path: Path, name: object) -> Path:
    relative = Path(str(name))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise SourceNotAllowed(
            f"{SAFETENSORS_INDEX} names the shard {str(name)[:200]!r}, outside the checkpoint "
            "folder. Shards must be files in the folder; fix the index."
        )
    return path / relative


def _safetensors_files(path: Path) -> list[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidCheckpoint(f"{index.name} is not a valid index ({exc}).") from exc
        files = sorted({_index_entry(path, name) for name in names})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidCheckpoint(
                f"shards listed in {index.name} are missing: {', '.join(missing)}. "
                "Re-download the checkpoint."
            )
        return files
    return sorted(path.glob("*.safetensors"))


def require_config(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InvalidCheckpoint(
            f"{path} has no config.json. Point `source` at a directory written by "
            "`save_pretrained` (config.json plus weights)."
        )


def inspect_checkpoint(path: Path, allowed: Sequence[Path]) -> CheckpointInfo:
    require_config(path)
    files = _safetensors_files(path)
    for file in files:
        if not within(file.resolve(), allowed):
            raise SourceNotAllowed(
                f"{file.name} resolves outside the allowed model roots (a symlink?). Put the "
                "weights themselves in the checkpoint folder."
            )
    sizes: dict[str, int] = {}
    found_in: dict[str, str] = {}
    if files:
        for file in files:
            for name, entry in read_safetensors_header(file).items():
                offsets = entry.get("data_offsets") if name != "__metadata__" else None
                if not isinstance(offsets, list):
                    continue
                if name in found_in:
                    raise InvalidCheckpoint(
                        f"tensor {name[:200]!r} is in two shards ({found_in[name]} and "
                        f"{file.name}); which one loads is undefined. {_REDO}"
                    )
                found_in[name] = file.name
                sizes[name] = int(offsets[1]) - int(offsets[0])
        return CheckpointInfo(path, tuple(files), sum(sizes.values()), sizes)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return CheckpointInfo(path, tuple(bins), sum(f.stat().st_size for f in bins))
    raise InvalidCheckpoint(
        f"{path} has no weights (*.safetensors or pytorch_model*.bin). "
        "Save the model with `save_pretrained` or download its weight files."
    )
