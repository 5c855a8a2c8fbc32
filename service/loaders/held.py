"""What the serving process knows of a held model: the loader's manifest, as facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.handles.descriptor import Handle
from service.loading.spec import Task


@dataclass(frozen=True)
class Placed:
    shareable: bool
    reason: str | None = None
    handle: Handle | None = None  # shareable models only


@dataclass
class Held:
    """A held model's facts; its memory is the fds in `HeldArenas` (or its runner)."""

    task: Task
    architecture: str
    dtype: str
    parameters: int
    resolved_revision: str | None
    by_device: dict[str, int]
    device_map: dict[str, str]
    placed: Placed
    checkpoint: Path  # the resolved folder (tokenizer and config files are served from it)
    allowed: tuple[Path, ...]  # where its files must resolve

    @property
    def segments(self) -> int:
        """Device segments (their fds come after the arena's)."""
        handle = self.placed.handle
        return len(handle.segments) if handle is not None else 0

    @property
    def needs_runner(self) -> bool:
        """Whether the loader stays alive holding the model: not shareable."""
        return not self.placed.shareable

    def to_json(self) -> dict[str, Any]:
        handle = self.placed.handle
        return {
            "task": self.task.value,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "parameters": self.parameters,
            "resolved_revision": self.resolved_revision,
            "by_device": self.by_device,
            "device_map": self.device_map,
            "shareable": self.placed.shareable,
            "reason": self.placed.reason,
            "handle": handle.model_dump(mode="json") if handle is not None else None,
            "checkpoint": str(self.checkpoint),
            "allowed": [str(path) for path in self.allowed],
        }

    @classmethod
    def from_json(cls, facts: dict[str, Any]) -> Held:
        handle = facts.get("handle")
        return cls(
            task=Task(facts["task"]),
            architecture=str(facts["architecture"]),
            dtype=str(facts["dtype"]),
            parameters=int(facts["parameters"]),
            resolved_revision=facts.get("resolved_revision"),
            by_device={str(k): int(v) for k, v in facts["by_device"].items()},
            device_map={str(k): str(v) for k, v in facts["device_map"].items()},
            placed=Placed(
                shareable=bool(facts["shareable"]),
                reason=facts.get("reason"),
                handle=Handle.model_validate(handle) if handle is not None else None,
            ),
            checkpoint=Path(facts["checkpoint"]),
            allowed=tuple(Path(path) for path in facts["allowed"]),
        )
